"""Energy per token on a CUDA GPU, the field's unit: prefill and decode of a Llama-3.2-1B-shaped model
(random weights: quality not meaningful; energy and kernels are) at fp32, bf16, fp16, w8a8 (int8
weights x int8 activations through torch._int_mm, the GPU's 8-bit here) and 2:4-pruned fp16.

Per precision, through the project's meter (``EnergyMeter.window``):

1. loaded idle: the model in memory, the device synchronised, nothing running (``--idle-s``);
2. prefill: ``--prefill-batch`` x ``--prefill-seq`` tokens (16 x 512), ``use_cache=False``, logits of
   the last position only, repeated inside each window until it lasts ``--min-window-s``;
   ``--repeats`` windows;
3. decode: greedy ``generate`` of exactly ``--decode-tokens`` new tokens (128) for ``--decode-batch``
   sequences (32) from 64-token prompts; one window.

For every window three readings of the same GPU energy are stored: the NVML total-energy counter
(what the meter reports), CodeCarbon's GPU figure for the same window (its own task), and the
integral of NVML power samples taken every 50 ms; their ratios say how far the tools agree. J per
token gross (counter) and net of the loaded idle (counter minus idle power x duration). 2:4: pruned by
magnitude, then the study's own planner converts only layer shapes whose cuSPARSELt kernel wins at
the prefill's token count (on an H100 none of the 1B's shapes do: ../shared/notes/h100-measurements.md),
verified against dense with the kernels that ran.

Results are appended to ``--out`` (JSON lines) as they exist; one line per precision is printed, and
the last line is ``energy_per_token=done precisions=<n measured> prefill_mj_bf16=<x> decode_mj_bf16=<y>``.

    python benchmarks/energy_per_token_gpu.py [--budget-s 80] [--out energy_per_token.jsonl]
    python benchmarks/energy_per_token_gpu.py --dry-run-cpu --fake-nvml --preset tiny ...   (rehearsal)

Needs torch with CUDA, transformers, nvidia-ml-py; pydantic for the 2:4 case (pruning settings) and
CodeCarbon for its reading (each left out, with the reason, when missing).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PRECISIONS = ("fp32", "bf16", "fp16", "w8a8", "fp16-2:4")


def log(msg: str) -> None:
    print(msg, flush=True)


def clean(value: Any) -> Any:
    """JSON without NaN (null instead)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def emit(out: Path | None, record: dict[str, Any]) -> None:
    if out is not None:
        with out.open("a") as fh:
            fh.write(json.dumps(clean(record), default=str) + "\n")


class Recording:
    """A meter source whose every reading is kept (the meter keeps only the preferred one)."""

    def __init__(self, source: Any):
        self.source = source
        self.name = source.name
        self.last: dict[str, Any] = {}

    def begin(self, window: str) -> None:
        self.source.begin(window)

    def end(self) -> dict[str, Any]:
        self.last = self.source.end()
        return self.last

    def close(self) -> None:
        self.source.close()


def settings() -> Any:
    try:
        from llm_energy.config import EnergySettings

        return EnergySettings(measure_power_secs=0.5, idle_seconds=0, detect_disturbance=False)
    except Exception:  # noqa: BLE001  (no pydantic: the meter needs only these attributes)
        return SimpleNamespace(country_iso_code="FRA", carbon_intensity_g_per_kwh=None,
                               measure_power_secs=0.5, tracking_mode="machine", idle_seconds=0.0,
                               min_window_s=0.0)


def make_meter(device: str, fake_nvml: bool,
               codecarbon: bool) -> tuple[Any, Recording, Recording | None, str]:
    from llm_energy.measure.meter import CodeCarbonSource, EnergyMeter, NvmlSource

    nvml_module = None
    if fake_nvml:
        from llm_energy.measure.fake_nvml import FakeNvml

        nvml_module = FakeNvml(power_w=100.0)
    nvml = Recording(NvmlSource(nvml=nvml_module, device_indices=[0], sample_power_s=0.05))
    cc, note = None, ""
    if codecarbon:
        try:
            cc = Recording(CodeCarbonSource(settings(), gpu_ids=[0] if device.startswith("cuda") else None))
        except Exception as exc:  # noqa: BLE001
            note = f"CodeCarbon unavailable: {type(exc).__name__}: {exc}"
            log(note)
    sources = [s for s in (cc, nvml) if s is not None]
    meter = EnergyMeter(settings(), device=device if device.startswith("cuda") else "cpu", sources=sources)
    return meter, nvml, cc, note


def window(meter: Any, nvml: Recording, cc: Recording | None, name: str, fn: Any, min_s: float,
           tokens_per_call: int, idle_w: float | None) -> dict[str, Any]:
    """One measured window: ``fn`` repeated until ``min_s``; the three readings, J/token gross and net."""
    calls = 0
    with meter.window(name) as handle:
        start = time.perf_counter()
        while calls == 0 or time.perf_counter() - start < min_s:
            fn()
            calls += 1
    record = handle.record
    counter_j = nvml.source.last_counter_j
    integral_j = nvml.source.last_power_integral_j
    cc_gpu = cc.last.get("gpu") if cc is not None else None
    cc_j = cc_gpu.energy_j if cc_gpu is not None else float("nan")
    tokens = calls * tokens_per_call
    reported_j = record.gpu_energy_kwh * 3.6e6
    net_j = reported_j - idle_w * record.duration_s if idle_w is not None else float("nan")

    def ratio(a: float, b: float) -> float:
        return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")

    return {"window": name, "duration_s": record.duration_s, "calls": calls, "tokens": tokens,
            "tokens_per_s": tokens / record.duration_s if record.duration_s else float("nan"),
            "gpu_method": record.gpu_method, "nvml_counter_j": counter_j, "codecarbon_gpu_j": cc_j,
            "codecarbon_gpu_method": cc_gpu.method if cc_gpu is not None else "none",
            "power_integral_j": integral_j, "codecarbon_over_counter": ratio(cc_j, counter_j),
            "integral_over_counter": ratio(integral_j, counter_j),
            "mj_per_token": reported_j * 1e3 / tokens, "mj_per_token_net": net_j * 1e3 / tokens,
            "idle_power_w": idle_w,
            "power_w": reported_j / record.duration_s if record.duration_s else float("nan")}


def variant(master: Any, precision: str, device: str, prefill_tokens: int,
            probe: Any) -> tuple[Any, dict[str, Any]]:
    """The master fp32 model at one precision (a copy; the master stays)."""
    import torch

    info: dict[str, Any] = {}
    if precision == "fp32":
        return master, info
    if precision in ("bf16", "fp16"):
        return (copy.deepcopy(master).to(getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[precision])),
                info)
    if precision == "w8a8":
        from llm_energy.models import quant8

        model = copy.deepcopy(master)
        info["quantized_layers"] = quant8.quantize_model(model)
        return model, info
    # fp16-2:4: magnitude 2:4, then the planner converts the shapes whose sparse kernel wins here
    from llm_energy.config import PruningSpec
    from llm_energy.methods.sparsify import prune_model
    from llm_energy.models import sparse_kernels as sparse

    model = copy.deepcopy(master).to(torch.float16)
    outcome = prune_model(model, PruningSpec("magnitude", "2:4"))
    info["verified_2_4"] = outcome.verified_nm
    gpu = device.startswith("cuda")
    backend = sparse.CusparseltBackend() if gpu else sparse.ReferenceBackend()
    reason = sparse.support_reason(device, torch.float16)
    info["sparse_support"] = reason or "cuSPARSELt"
    plans = sparse.plan(model, [prefill_tokens], min_speedup=1.05, backend=backend, iters=10, warmup=3,
                        timer=None if gpu else sparse.wall_time)
    info["plan"] = sparse.plan_rows(plans)
    converted, check = sparse.convert_and_verify(model, plans, lambda: probe(model), backend,
                                                 check_kernels=gpu)
    info.update(converted_layers=len(converted), candidate_layers=sum(len(p.layers) for p in plans),
                check=check.reason, sparse_kernels=check.sparse_kernels[:5], verified=check.ok)
    return model, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-3.2-1b", help="llama-3.2-1b, smollm2-135m or tiny")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--prefill-batch", type=int, default=16)
    parser.add_argument("--prefill-seq", type=int, default=512)
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="prefill windows per precision")
    parser.add_argument("--min-window-s", type=float, default=1.5)
    parser.add_argument("--idle-s", type=float, default=2.0)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new precision after this many s")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dry-run-cpu", action="store_true", help="on the CPU (no energy meaning)")
    parser.add_argument("--fake-nvml", action="store_true", help="a stand-in NVML (rehearsal)")
    parser.add_argument("--no-codecarbon", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    import torch

    from llm_energy.models.random_shapes import RANDOM_NOTE, build_model

    device = "cpu" if args.dry_run_cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        log("energy_per_token: no CUDA GPU visible (use --dry-run-cpu to rehearse)")
        return 3
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    meter, nvml, cc, cc_note = make_meter(device, args.fake_nvml, not args.no_codecarbon)
    t0 = time.perf_counter()
    master = build_model(args.preset, torch.float32, device)
    n_params = sum(p.numel() for p in master.parameters())
    env = {"kind": "environment", "preset": args.preset, "parameters": n_params, "note": RANDOM_NOTE,
           "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)",
           "torch": torch.__version__, "nvml_method": nvml.source.method,
           "nvml_fallback": nvml.source.fallback_reason,
           "codecarbon": "none" if cc is None else json.dumps(cc.source.methods), "codecarbon_note": cc_note,
           "build_s": time.perf_counter() - t0, "prefill": [args.prefill_batch, args.prefill_seq],
           "decode": [args.decode_batch, args.decode_tokens]}
    emit(args.out, env)
    log(f"{args.preset}: {n_params / 1e9:.3f} B parameters ({RANDOM_NOTE}); NVML {nvml.source.method}; "
        f"CodeCarbon {'off' if cc is None else cc.source.methods}")
    gen = torch.Generator(device=device).manual_seed(0)
    vocab = min(master.config.vocab_size, 49152)  # SmolLM2's token ids: valid in both vocabularies
    ids = torch.randint(0, vocab, (args.prefill_batch, args.prefill_seq), device=device, generator=gen)
    prompt = torch.randint(0, vocab, (args.decode_batch, args.prompt_tokens), device=device, generator=gen)
    prefill_tokens = args.prefill_batch * args.prefill_seq
    decode_tokens = args.decode_batch * args.decode_tokens

    def prefill(model: Any) -> Any:
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        sync()
        return out

    def hidden(model: Any) -> Any:
        with torch.inference_mode():
            return model.model(input_ids=ids, use_cache=False).last_hidden_state

    def decode(model: Any, new: int) -> None:
        with torch.inference_mode():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync()

    done: dict[str, dict[str, Any]] = {}
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            log(f"{precision}: skipped, the {args.budget_s:.0f} s budget is spent")
            emit(args.out, {"kind": "skipped", "precision": precision, "reason": "budget"})
            continue
        t0 = time.perf_counter()
        try:
            model, info = variant(master, precision, device, prefill_tokens, hidden)
            sync()
            with meter.window(f"{precision}:idle") as handle:
                time.sleep(args.idle_s)
            idle_w = handle.record.gpu_energy_kwh * 3.6e6 / handle.record.duration_s  # the GPU's own
            prefill(model)
            prefill(model)  # warm-up
            windows = [window(meter, nvml, cc, f"{precision}:prefill#{i + 1}", lambda: prefill(model),
                              args.min_window_s, prefill_tokens, idle_w) for i in range(args.repeats)]
            decode(model, 4)  # warm-up
            windows.append(window(meter, nvml, cc, f"{precision}:decode",
                                  lambda: decode(model, args.decode_tokens), 0.0, decode_tokens, idle_w))
            pre = [w for w in windows if ":prefill" in w["window"]]
            row = {"kind": "precision", "precision": precision, "idle_power_w": idle_w, **info,
                   "prefill_mj_per_token": sorted(w["mj_per_token"] for w in pre)[len(pre) // 2],
                   "prefill_mj_per_token_net": sorted(w["mj_per_token_net"] for w in pre)[len(pre) // 2],
                   "prefill_tokens_per_s": sorted(w["tokens_per_s"] for w in pre)[len(pre) // 2],
                   "decode_mj_per_token": windows[-1]["mj_per_token"],
                   "decode_mj_per_token_net": windows[-1]["mj_per_token_net"],
                   "decode_tokens_per_s": windows[-1]["tokens_per_s"], "windows": windows,
                   "seconds": time.perf_counter() - t0}
            done[precision] = row
            emit(args.out, row)
            log(f"{precision:>9}: prefill {row['prefill_mj_per_token']:.3f} mJ/token "
                f"(net {row['prefill_mj_per_token_net']:.3f}, {row['prefill_tokens_per_s']:,.0f} tokens/s); "
                f"decode {row['decode_mj_per_token']:.2f} mJ/token (net "
                f"{row['decode_mj_per_token_net']:.2f}, {row['decode_tokens_per_s']:,.0f} tokens/s); idle "
                f"{idle_w:.0f} W; CodeCarbon/counter {windows[-1]['codecarbon_over_counter']:.3f}, "
                f"integral/counter {windows[-1]['integral_over_counter']:.3f}"
                + (f"; 2:4 {info['converted_layers']}/"
                                                                 f"{info['candidate_layers']} layers sparse"
                                                                 if "converted_layers" in info else ""))
            if model is not master:
                del model
        except Exception as exc:  # report, go on with the next precision
            log(f"{precision}: failed: {type(exc).__name__}: {exc}")
            emit(args.out, {"kind": "error", "precision": precision, "error": f"{type(exc).__name__}: {exc}"})
        if device == "cuda":
            torch.cuda.empty_cache()
    meter.close()
    bf16 = done.get("bf16", {})
    log(f"energy_per_token=done precisions={len(done)} "
        f"prefill_mj_bf16={bf16.get('prefill_mj_per_token', float('nan')):.4f} "
        f"decode_mj_bf16={bf16.get('decode_mj_per_token', float('nan')):.4f}")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
