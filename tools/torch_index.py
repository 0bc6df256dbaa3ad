"""Which index `make setup` installs torch from: prints pip's index arguments for a TORCH_INDEX value,
and says on stderr what it chose and why.

    python tools/torch_index.py auto|default|cpu|cu126|cu128|cu130|URL

``auto`` (the default) decides as uv's ``--torch-backend=auto`` does: a machine with ``nvidia-smi`` gets
the newest CUDA build its driver supports (the "CUDA Version" nvidia-smi prints), any other machine the
CPU-only build. ``default`` is pip's own configuration (PyPI: the CUDA build on Linux x86-64).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import urllib.request

PYTORCH_INDEX = "https://download.pytorch.org/whl"
# CUDA builds published for the torch this project pins, newest first: (tag, the CUDA version it needs)
CUDA_TAGS: tuple[tuple[str, tuple[int, int]], ...] = (("cu130", (13, 0)), ("cu128", (12, 8)),
                                                      ("cu126", (12, 6)))


def driver_cuda() -> tuple[int, int] | None:
    """The highest CUDA version the installed NVIDIA driver supports, or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def reachable(index: str, timeout: float = 5.0) -> bool:
    """Whether the index answers (its torch page), within a few seconds."""
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{index}/torch/", method="HEAD"),
                                    timeout=timeout):
            return True
    except Exception:  # noqa: BLE001  (no network, no DNS, refused, HTTP error: all mean "not from here")
        return False


def choose(value: str) -> tuple[list[str], str]:
    """pip's index arguments for a TORCH_INDEX value, and a sentence saying why."""
    if value == "default":
        return [], "pip's own configuration (PyPI: on Linux x86-64 that is the CUDA build, about 3 GB)"
    if "://" in value:
        return ["--index-url", value], f"the index {value}"
    if value != "auto":
        return ["--index-url", f"{PYTORCH_INDEX}/{value}"], f"the {value} build ({PYTORCH_INDEX}/{value})"
    cuda = driver_cuda()
    if cuda is None:
        if not reachable(f"{PYTORCH_INDEX}/cpu"):
            # e.g. a machine that reaches only PyPI, with a local wheel folder in pip.conf: pip retrying an
            # unreachable index for every package would only add minutes
            return [], (f"auto: no nvidia-smi on this machine, but {PYTORCH_INDEX}/cpu cannot be reached "
                        "from here, so pip's own configuration (PyPI's torch is the CUDA build unless "
                        "pip.conf offers a CPU wheel; TORCH_INDEX=cpu forces the CPU index)")
        return (["--index-url", f"{PYTORCH_INDEX}/cpu"],
                "auto: no nvidia-smi on this machine, so the CPU-only build")
    for tag, needs in CUDA_TAGS:
        if cuda >= needs:
            return (["--index-url", f"{PYTORCH_INDEX}/{tag}"],
                    f"auto: the NVIDIA driver supports CUDA {cuda[0]}.{cuda[1]}, so the {tag} build")
    return (["--index-url", f"{PYTORCH_INDEX}/cpu"],
            f"auto: the NVIDIA driver supports only CUDA {cuda[0]}.{cuda[1]}, older than every CUDA build of "
            "this torch, so the CPU-only build (update the driver, or set TORCH_INDEX=cuXXX)")


def main() -> None:
    value = sys.argv[1] if len(sys.argv) > 1 else "auto"
    args, why = choose(value)
    print(f"torch: TORCH_INDEX={value}: {why}", file=sys.stderr)
    print(" ".join(args))


if __name__ == "__main__":
    main()
