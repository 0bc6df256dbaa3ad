"""2:4 semi-structured sparsity on a CUDA GPU: does it pay for prefill, and where?

For each model shape (random weights of a realistic Llama shape: model files cannot travel to the
GPU machine) and each half precision, the script

1. builds the model on the GPU, prunes every decoder linear layer 2:4 by magnitude (``prune_model``)
   and checks the pattern;
2. times dense against 2:4 sparse matmuls (cuSPARSELt, default and searched algorithm) for every
   distinct layer shape at several token counts: the table that says *why* naive conversion is slow;
3. measures prefill (batch x seq tokens, ``use_cache=False``, logits of the last position only) for
   - ``dense``: the pruned weights through dense kernels (the baseline: same weights, same outputs),
   - ``naive``: every layer converted with ``torch.sparse.to_sparse_semi_structured``,
   - ``planned``: ``llm_energy.models.sparse_kernels.plan`` + ``apply`` (only shapes that win,
     searched algorithm, direct kernel calls, dense below the crossover token count);
   throughput (tokens/s, CUDA-synchronised wall time) and energy per token from the NVML
   total-energy counter (gross and net of an idle baseline measured first), median and spread of
   ``--repeats`` windows of at least ``--min-seconds`` each;
4. converts through the study's own ``sparse.convert_and_verify``: the final hidden states against
   the dense model (relative L2 error), the sparse-path call counts, and the CUDA kernel names seen
   by the PyTorch profiler (a sparse kernel must be among them); a failed check reverts to dense,
   prints why, and the case reports ``verified=False``;
5. optionally times greedy decode (batch 32) dense against planned, to show decode is not slowed.

Every result is appended to ``--out`` (JSON lines) as soon as it exists, so a run cut short keeps
what it measured. The last line is machine-readable:
``prefill_speedup=<planned/dense> energy_per_token_ratio=<planned/dense> preset=<p> dtype=<d>
target_met=<bool>``
(best preset and dtype by speedup; target: speedup >= 1.1 with lower energy per token).

    python benchmarks/sparse24_gpu.py [--presets llama-70b-slice,llama-1b] [--dtypes fp16]
        [--batch 16 --seq 512] [--repeats 5] [--min-seconds 2] [--budget-s 420] [--out sparse24.jsonl]

Needs torch with CUDA and cuSPARSELt, transformers, nvidia-ml-py (energy; throughput still runs
without it); nothing else of the project's dependencies (no pydantic, CodeCarbon or bitsandbytes), so
on the lent GPU machine, whose image has those three, it runs from a plain checkout:

    PYTHONPATH=lib PYTHONUNBUFFERED=1 python3 benchmarks/sparse24_gpu.py --out $OUT/sparse24.jsonl

Without a usable GPU it prints why and exits with status 3. Status: written and run end to end on the
CPU (``--dry-run-cpu``, in the tests); not yet run on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name: (hidden, intermediate, layers, heads, kv heads, vocab). The "slice" presets keep the layer
# shapes of the large model but few layers, so they fit and build quickly; per-token cost of the
# decoder blocks is what the comparison is about.
PRESETS = {
    "llama-1b": (2048, 8192, 16, 32, 8, 128256),  # Llama-3.2-1B shape, untied head: 1.5 B parameters
    "llama-8b-slice": (4096, 14336, 8, 32, 8, 128256),  # Llama-3-8B layer shapes, 8 of its 32 layers
    "llama-70b-slice": (8192, 28672, 4, 64, 8, 128256),  # Llama-3-70B layer shapes, 4 of its 80 layers
    "tiny": (64, 128, 2, 4, 2, 512),  # for --dry-run-cpu only
}
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


class Device:
    """The GPU, or (``--dry-run-cpu``) the CPU with the reference backend: the same steps, so the
    script's plumbing is tested without a GPU; no kernel, energy or naive-conversion result there."""

    def __init__(self, dry_run: bool):
        import torch

        from llm_energy.models import sparse_kernels as sparse

        self.dry_run = dry_run
        self.name = "cpu" if dry_run else "cuda"
        self.backend = sparse.ReferenceBackend() if dry_run else sparse.CusparseltBackend()
        self.timer = sparse.wall_time if dry_run else None
        self._torch = torch

    def sync(self) -> None:
        if not self.dry_run:
            self._torch.cuda.synchronize()


def fmt_mj(value: float | None) -> str:
    return "energy not measured" if value is None else f"{value:.3f} mJ/token"


def log(msg: str) -> None:
    print(msg, flush=True)


def emit(out: Path | None, record: dict[str, Any]) -> None:
    if out is not None:
        with out.open("a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")


def build_model(preset: str, dtype: Any, device: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = PRESETS[preset]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


class Nvml:
    """Whole-GPU energy (J) from the NVML total-energy counter of the job's GPU."""

    def __init__(self, module: Any = None) -> None:
        from llm_energy.measure.meter import NvmlSource, nvml_indices

        # module: a pynvml stand-in (the tests' fake counter); None reads the real driver library.
        self.source = NvmlSource(nvml=module, device_indices=nvml_indices("cuda:0"))

    def joules(self, fn: Any) -> float:
        self.source.begin("bench")
        fn()
        return self.source.end()["gpu"].energy_j


def try_nvml() -> Nvml | None:
    try:
        return Nvml()
    except Exception as exc:  # no driver library or no permission: throughput only
        log(f"NVML unavailable ({exc}); energy is not measured")
        return None


def idle_power(nvml: Nvml | None, seconds: float, dev: Device) -> float | None:
    if nvml is None:
        return None
    dev.sync()
    return nvml.joules(lambda: time.sleep(seconds)) / seconds


def measure(fn: Any, tokens_per_call: int, nvml: Nvml | None, idle_w: float | None, repeats: int,
            min_seconds: float, dev: Device, warmup: int = 3) -> dict[str, Any]:
    """Median tokens/s and mJ/token over repeats; each repeat runs ``fn`` for at least min_seconds."""
    for _ in range(warmup):
        fn()
    dev.sync()
    start = time.perf_counter()
    fn()
    dev.sync()
    calls = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6)) + 1)

    def window() -> None:
        for _ in range(calls):
            fn()
        dev.sync()

    rates, mj, mj_net = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        joules = nvml.joules(window) if nvml is not None else None
        if nvml is None:
            window()
        seconds = time.perf_counter() - t0
        tokens = calls * tokens_per_call
        rates.append(tokens / seconds)
        if joules is not None:
            mj.append(joules * 1e3 / tokens)
            if idle_w is not None:
                mj_net.append((joules - idle_w * seconds) * 1e3 / tokens)

    def spread(values: list[float]) -> float | None:
        return statistics.stdev(values) if len(values) > 1 else None

    return {
        "tokens_per_s": statistics.median(rates), "tokens_per_s_std": spread(rates),
        "mj_per_token": statistics.median(mj) if mj else None, "mj_per_token_std": spread(mj) if mj else None,
        "mj_per_token_net": statistics.median(mj_net) if mj_net else None,
        "calls_per_window": calls, "repeats": repeats, "energy_method": "nvml_counter" if mj else "none",
    }


def run_case(preset: str, dtype_name: str, args: argparse.Namespace, nvml: Nvml | None, idle_w: float | None,
             out: Path | None, dev: Device) -> dict[str, Any]:
    import torch
    from torch.sparse import to_sparse_semi_structured

    from llm_energy.config import PruningSpec
    from llm_energy.methods.sparsify import prune_model
    from llm_energy.models import sparse_kernels as sparse

    dtype = getattr(torch, DTYPES[dtype_name])
    t0 = time.perf_counter()
    model = build_model(preset, dtype, dev.name)
    n_params = sum(p.numel() for p in model.parameters())
    outcome = prune_model(model, PruningSpec("magnitude", "2:4"))
    log(f"\n== {preset} {dtype_name}: {n_params / 1e9:.2f} B parameters, 2:4 verified={outcome.verified_nm}, "
        f"measured sparsity {outcome.measured_sparsity:.4f} of pruned layers, built+pruned in "
        f"{time.perf_counter() - t0:.1f} s")

    # Loaded idle: the model in memory, the device synchronised, nothing running. Net energy per token
    # subtracts this (the system idle measured before any model is in provenance beside it).
    system_idle_w = idle_w
    loaded_idle_w = idle_power(nvml, args.idle_seconds, dev)
    idle_w = loaded_idle_w if loaded_idle_w is not None else system_idle_w
    gen = torch.Generator(device=dev.name).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=dev.name, generator=gen)
    tokens = args.batch * args.seq

    def prefill(m: Any) -> Any:
        with torch.inference_mode():
            return m(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    def hidden(m: Any) -> Any:
        with torch.inference_mode():
            return m.model(input_ids=ids, use_cache=False).last_hidden_state

    # Kernel-level table: why converting everything is slow.
    token_counts = sorted(set(args.token_counts or [512, 2048, tokens, 4 * tokens]))
    plans = sparse.plan(model, token_counts, min_speedup=args.min_speedup, backend=dev.backend,
                        timer=dev.timer)
    for p in plans:  # a shape that wins only above this prefill's token count would never run sparse here
        if p.convert and p.min_tokens > tokens:
            p.convert = False
            p.reason += f"; not at this prefill's {tokens} tokens, so kept dense"
    log("kernel level (speedup = dense time / sparse time; 'default' = alg 0, 'searched' = best algorithm):")
    log(f"{'shape':>14} {'layers':>6} {'tokens':>7} {'dense ms':>9} {'default':>8} {'searched':>8} alg")
    for p in plans:
        for t in p.timings:
            default = t.dense_s / t.sparse_default_alg_s if t.sparse_default_alg_s else float("nan")
            log(f"{p.out_features:>6}x{p.in_features:<7} {len(p.layers):>6} {t.tokens:>7} "
                f"{t.dense_s * 1e3:>9.3f} {default:>8.2f} {t.speedup:>8.2f} {t.alg_id}")
        log(f"   -> {'convert' if p.convert else 'keep dense'}: {p.reason}")
    emit(out, {"kind": "kernels", "preset": preset, "dtype": dtype_name, "plan": sparse.plan_rows(plans)})

    new_tokens = args.decode_batch * args.decode_tokens
    prompt = ids[: args.decode_batch, :64]

    def generate(m: Any) -> None:
        with torch.inference_mode():
            m.generate(input_ids=prompt, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens,
                       do_sample=False, pad_token_id=0)

    reference = hidden(model)
    dense = measure(lambda: prefill(model), tokens, nvml, idle_w, args.repeats, args.min_seconds, dev)
    log(f"dense   : {dense['tokens_per_s']:,.0f} tokens/s, {fmt_mj(dense['mj_per_token'])}")
    decode: dict[str, Any] | None = None
    if args.decode_tokens > 0:
        decode = {"dense": measure(lambda: generate(model), new_tokens, nvml, idle_w, 2, 0.5, dev, warmup=1)}

    naive: dict[str, Any] | None = None
    if not args.skip_naive and not dev.dry_run:
        try:
            naive_model = copy.deepcopy(model)
            for names in sparse.candidate_layers(naive_model).values():
                for name in names:
                    layer = naive_model.get_submodule(name)
                    layer.weight = torch.nn.Parameter(to_sparse_semi_structured(layer.weight.detach()),
                                                      requires_grad=False)
            naive = measure(lambda: prefill(naive_model), tokens, nvml, idle_w, args.repeats,
                            args.min_seconds, dev)
            naive["rel_l2_hidden"] = sparse.compare_outputs(reference, hidden(naive_model))["rel_l2"]
            log(f"naive   : {naive['tokens_per_s']:,.0f} tokens/s, {fmt_mj(naive['mj_per_token'])}")
            del naive_model
        except Exception as exc:  # report, keep going
            naive = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"naive   : failed: {naive['error']}")
        torch.cuda.empty_cache()

    # The study's own path: convert, check against the dense outputs, revert with the reason if a check fails.
    converted, check = sparse.convert_and_verify(model, plans, lambda: hidden(model), dev.backend,
                                                 tolerance=args.tolerance, check_kernels=not dev.dry_run)
    total = sum(len(p.layers) for p in plans)
    planned = measure(lambda: prefill(model), tokens, nvml, idle_w, args.repeats, args.min_seconds, dev)
    log(f"planned : {planned['tokens_per_s']:,.0f} tokens/s, {fmt_mj(planned['mj_per_token'])}; "
        f"{len(converted)}/{total} layers sparse; check: {'ok' if check.ok else 'FAILED'} ({check.reason})")
    if decode is not None:
        decode["planned"] = measure(lambda: generate(model), new_tokens, nvml, idle_w, 2, 0.5, dev, warmup=1)
        log(f"decode batch {args.decode_batch}: dense {decode['dense']['tokens_per_s']:,.0f} tokens/s, "
            f"planned {decode['planned']['tokens_per_s']:,.0f} tokens/s")

    speedup = planned["tokens_per_s"] / dense["tokens_per_s"]
    energy_ratio = (planned["mj_per_token"] / dense["mj_per_token"]
                    if planned["mj_per_token"] and dense["mj_per_token"] else None)
    verified = check.ok
    record = {
        "kind": "prefill", "preset": preset, "dtype": dtype_name, "parameters": n_params,
        "system_idle_power_w": system_idle_w, "loaded_idle_power_w": loaded_idle_w,
        "batch": args.batch, "seq": args.seq, "dense": dense, "naive": naive, "planned": planned,
        "decode": decode, "converted_layers": len(converted), "candidate_layers": total,
        "rel_l2_hidden": check.rel_l2, "sparse_calls": check.sparse_calls,
        "sparse_kernels": check.sparse_kernels[:5], "check": check.reason, "verified": verified,
        "prefill_speedup": speedup, "energy_per_token_ratio": energy_ratio,
        "naive_speedup": naive["tokens_per_s"] / dense["tokens_per_s"] if naive and "tokens_per_s" in naive
        else None,
    }
    emit(out, record)
    log(f"preset={preset} dtype={dtype_name} prefill_speedup={speedup:.3f} naive_speedup="
        f"{record['naive_speedup'] if record['naive_speedup'] is None else round(record['naive_speedup'], 3)} "  # noqa: E501
        f"energy_per_token_ratio={energy_ratio if energy_ratio is None else round(energy_ratio, 3)} "
        f"verified={verified}")
    model = reference = None  # drop the references so empty_cache can free the memory
    if not dev.dry_run:
        torch.cuda.empty_cache()
    return record


def main(argv: list[str] | None = None, nvml_module: Any = None) -> int:
    """``nvml_module``: a pynvml stand-in whose counter the energy path reads (tests run the dry run
    through a fake one, so the energy arithmetic runs before any GPU session)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="llama-70b-slice,llama-1b",
                        help=f"comma-separated, from {', '.join(PRESETS)}")
    parser.add_argument("--dtypes", default="fp16", help="comma-separated: fp16, bf16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=2.0,
                        help="minimum length of one measured window")
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--min-speedup", type=float, default=1.05,
                        help="convert a shape only above this kernel speedup")
    parser.add_argument("--tolerance", type=float, default=2e-2,
                        help="max relative L2 error of hidden states")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--decode-tokens", type=int, default=32, help="0 skips the decode comparison")
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file, appended as results arrive")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new preset/dtype case after this many seconds (the last line still "
                             "prints)")
    parser.add_argument("--token-counts", type=lambda v: [int(t) for t in v.split(",") if t.strip()],
                        default=None, help="comma-separated token counts of the kernel table (default: 512, "
                             "2048, the prefill's and 4x it)")
    parser.add_argument("--fake-nvml", action="store_true",
                        help="a stand-in NVML counter (rehearsal; no meaning)")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="run every step on the CPU with a dense reference backend (tests the script, "
                             "measures nothing)")
    args = parser.parse_args(argv)

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [p for p in presets if p not in PRESETS] + [d for d in dtypes if d not in DTYPES]
    if bad:
        parser.error(f"unknown preset or dtype: {', '.join(bad)} (presets: {', '.join(PRESETS)}; dtypes: "
                     "fp16, bf16)")

    import torch

    from llm_energy.models import sparse_kernels as sparse

    dev = Device(args.dry_run_cpu)
    if dev.dry_run:
        env = {"kind": "environment", "torch": torch.__version__,
               "device": "cpu (dry run: reference backend)"}
    else:
        reasons = {d: sparse.support_reason("cuda", getattr(torch, DTYPES[d])) for d in dtypes}
        if any(reasons.values()):
            log("sparse24_gpu: cannot run here: " + "; ".join(f"{d}: {r}" for d, r in reasons.items() if r))
            return 3
        env = {"kind": "environment", "torch": torch.__version__, "cuda": torch.version.cuda,
               "gpu": torch.cuda.get_device_name(0), "capability": torch.cuda.get_device_capability(0),
               "cusparselt": torch.backends.cusparselt.version()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        log("sparse24_gpu: transformers is not installed")
        return 3
    log(" ".join(f"{k}={v}" for k, v in env.items() if k != "kind"))
    if nvml_module is None and args.fake_nvml:
        from llm_energy.measure.fake_nvml import FakeNvml

        nvml_module = FakeNvml(power_w=100.0)
    if nvml_module is not None:
        nvml: Nvml | None = Nvml(nvml_module)
    else:
        nvml = None if dev.dry_run else try_nvml()
    idle_w = idle_power(nvml, args.idle_seconds, dev)
    env["idle_power_w"] = idle_w
    log(f"idle power {idle_w:.1f} W over {args.idle_seconds:.0f} s (NVML counter)" if idle_w
        else "no idle baseline")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    emit(args.out, env)

    records = []
    started = time.perf_counter()
    for preset in presets:
        for dtype_name in dtypes:
            if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                log(f"{preset} {dtype_name}: skipped, the {args.budget_s:.0f} s budget is spent")
                emit(args.out, {"kind": "skipped", "preset": preset, "dtype": dtype_name, "reason": "budget"})
                continue
            try:
                records.append(run_case(preset, dtype_name, args, nvml, idle_w, args.out, dev))
            except Exception as exc:
                log(f"{preset} {dtype_name}: failed: {type(exc).__name__}: {exc}")
                emit(args.out, {"kind": "error", "preset": preset, "dtype": dtype_name, "error": repr(exc)})
                if not dev.dry_run:
                    torch.cuda.empty_cache()
    if not records:
        log("prefill_speedup=nan energy_per_token_ratio=nan preset=none dtype=none target_met=False")
        return 1
    best = max(records, key=lambda r: r["prefill_speedup"])
    ratio = best["energy_per_token_ratio"]
    met = best["prefill_speedup"] >= 1.1 and ratio is not None and ratio < 1.0 and best["verified"]
    log(f"prefill_speedup={best['prefill_speedup']:.3f} energy_per_token_ratio="
        f"{'nan' if ratio is None else f'{ratio:.3f}'} preset={best['preset']} dtype={best['dtype']} "
        f"target_met={met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
