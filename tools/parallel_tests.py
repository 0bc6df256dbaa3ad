"""`make test` on both cores: two pytest processes side by side, then one closing line for both.

The tests that read the smoke study (marked ``smoke`` by the root conftest.py) run in one process, so
the study is built once, with the few marked ``beside_smoke`` that balance the two; everything else
runs in the other. Then the tests marked ``quiet`` (they
measure whether a window was disturbed, so each group would be the other's co-tenant) run alone.
Their outputs are printed one after the other when all are done, then the combined counts as
`N passed, N failed, N skipped`.

    python tools/parallel_tests.py [-m EXPR] [--workers 1] [PYTEST ARGS...]

``-m EXPR`` narrows both groups (make test-fast: -m "not slow"); ``--workers 1`` runs one plain pytest.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (with the real-SLURM studies beside the smoke study the groups took 719 and 697 s; without, 557 and 698;
# on 2026-12-06, AMD EPYC, 532 and 739 s: the failing-config study, 64 s, moved beside the smoke study by
# its marker `beside_smoke`, and the killed-and-resumed study cut from seven precisions to four; with warm
# kernels the smoke study's group took 457 s and the other 613 s: the GPU check's dry run, ~60 s, moved over)
GROUPS = (("smoke study", "(smoke or beside_smoke) and not quiet"),
          ("everything else", "not smoke and not beside_smoke and not quiet"))
ALONE = ("alone, on a quiet machine", "quiet")
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def counts(text: str) -> dict[str, int]:
    """The counts of pytest's closing line (its last line with "passed", "failed" or "no tests ran")."""
    lines = [line for line in text.splitlines() if re.search(r"\b(passed|failed|error|no tests ran)\b", line)]
    found: dict[str, int] = {}
    for number, word in COUNT.findall(lines[-1] if lines else ""):
        found["error" if word.startswith("error") else word] = int(number)
    return found


DURATIONS = ROOT / "tools" / "test_durations.json"  # seconds per test file in make test-fast, measured


def split_files() -> list[list[str]]:
    """The test files (and the notebooks folder, for nbval) in two halves of about equal duration: the
    longest first, each to the lighter half, by the seconds tools/test_durations.json measured (a file
    not in it counts one second per 2 kB)."""
    import json

    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}

    def seconds(path: Path) -> float:
        value = known.get(str(path.relative_to(ROOT)))
        return float(value) if isinstance(value, (int, float)) else path.stat().st_size / 2000

    files = sorted(ROOT.glob("tests/**/test_*.py"), key=lambda p: (-seconds(p), str(p)))
    halves: list[list[str]] = [[], []]
    load = [0.0, 0.0]
    for path in files:
        lighter = load.index(min(load))
        halves[lighter].append(str(path.relative_to(ROOT)))
        load[lighter] += seconds(path)
    halves[load.index(min(load))].append("notebooks")
    return halves


def quiet_files() -> list[str] | None:
    """The test files whose text marks a test ``quiet`` (``pytest.mark.quiet``, on a test or in
    ``pytestmark``); None (every file) if none does. A test made quiet another way (a conftest hook)
    would not be collected: mark quiet tests in their own file."""
    marked = [str(path.relative_to(ROOT)) for path in sorted(ROOT.glob("tests/**/test_*.py"))
              if re.search(r"mark\.quiet\b", path.read_text(errors="replace"))]
    return marked or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", dest="expr", default="", help="marker expression both groups also satisfy")
    parser.add_argument("--workers", type=int, default=2)
    args, rest = parser.parse_known_args()
    if args.workers < 2:
        return subprocess.call([sys.executable, "-m", "pytest", *(["-m", args.expr] if args.expr else []),
                                *rest],
                               cwd=ROOT)
    start = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="llm-energy-tests-"))
    def launch(index: int, name: str, group: str,
               paths: list[str] | None = None) -> tuple[str, str, subprocess.Popen, Path, object]:
        expr = f"({group}) and ({args.expr})" if args.expr else group
        log = base / f"group{index}.log"
        handle = log.open("w")
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-m", expr, "--basetemp",
                                 str(base / f"tmp{index}"), "-p", "no:cacheprovider", *(paths or []), *rest],
                                cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
        print(f"pytest -m '{expr}' ({name}): running, output in {log}", flush=True)
        return name, expr, proc, log, handle

    if args.expr:
        # a narrowed run (make test-fast: -m "not slow") selects no smoke test, so the marker groups would
        # leave one core idle: the test files are split in two halves by size instead
        halves = split_files()
        runs = [launch(index, f"files, half {index + 1}", "not quiet", paths)
                for index, paths in enumerate(halves)]
    else:
        runs = [launch(index, name, group) for index, (name, group) in enumerate(GROUPS)]
    for run in runs:
        run[2].wait()
    # after both groups: nothing else of ours runs beside them; only the files that mark a test quiet are
    # collected (collecting all of them imports every test module: ~8 s of a 17 s group)
    # (paths given on the command line narrow every group, the quiet one included, as before)
    named_paths = any((ROOT / arg.split("::")[0]).exists() for arg in rest if not arg.startswith("-"))
    runs.append(launch(len(GROUPS), *ALONE, None if named_paths else quiet_files()))
    total: dict[str, int] = {}
    status = 0
    for name, expr, proc, log, handle in runs:
        code = proc.wait()
        handle.close()
        text = log.read_text(errors="replace")
        print(f"\n===== pytest -m '{expr}' ({name}): exit {code} =====\n{text}", flush=True)
        for key, value in counts(text).items():
            total[key] = total.get(key, 0) + value
        if code not in (0, 5):  # 5: no test selected in this group (e.g. test-fast has no smoke tests)
            status = status or code
    if not total.get("passed"):
        status = status or 5
    if status == 0:  # the logs were printed above; the tests' folders (~140 MB) are not worth keeping
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"logs and the tests' temporary folders kept in {base}")
    print(f"all groups in {time.perf_counter() - start:.0f} s")
    print(f"{total.get('passed', 0)} passed, {total.get('failed', 0) + total.get('error', 0)} failed, "
          f"{total.get('skipped', 0)} skipped")
    return status


if __name__ == "__main__":
    sys.exit(main())
