"""2:4 sparse execution: the layer's plumbing and the planning rules on CPU (reference backend);
the cuSPARSELt kernel itself only where a CUDA GPU with sparse tensor cores is visible."""

import pytest
import torch

from llm_energy.config import ModelSettings, PruningSpec
from llm_energy.methods.sparsify import prune_model
from llm_energy.models import sparse_kernels as sparse
from llm_energy.models.loading import load_model

TINY = ModelSettings(name="tiny-random-llama")


def pruned_linear(out_features=32, in_features=64, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        groups = layer.weight.abs().reshape(out_features, -1, 4)
        drop = groups.argsort(dim=-1)[..., :2]
        mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        layer.weight.mul_(mask.reshape(out_features, in_features))
    return layer


def test_cpu_has_no_sparse_kernel_and_says_so():
    reason = sparse.support_reason("cpu")
    assert "dense kernels" in reason and "energy is not expected to fall" in reason


@pytest.mark.parametrize("tokens", [16, 13, 1])  # a multiple of 8, one that needs padding, decode-sized
def test_layer_matches_dense_linear_for_any_token_count(tokens):
    layer = pruned_linear()
    converted = sparse.Sparse24Linear(layer, sparse.ReferenceBackend(), keep_dense=False)
    x = torch.randn(1, tokens, 64)
    torch.testing.assert_close(converted(x), layer(x))
    assert converted(x).shape == (1, tokens, 32)
    assert converted.sparse_calls == 2 and converted.dense_calls == 0


def test_layer_runs_dense_below_min_tokens_and_sparse_from_it():
    layer = pruned_linear(bias=False)
    converted = sparse.Sparse24Linear(layer, sparse.ReferenceBackend(), min_tokens=64)
    small, large = torch.randn(2, 8, 64), torch.randn(4, 16, 64)
    torch.testing.assert_close(converted(small), layer(small))
    assert (converted.sparse_calls, converted.dense_calls) == (0, 1)
    torch.testing.assert_close(converted(large), layer(large))
    assert (converted.sparse_calls, converted.dense_calls) == (1, 1)


def test_layer_sees_the_padded_activation_and_drops_the_padding():
    seen = []

    class Recording(sparse.ReferenceBackend):
        def matmul(self, packed, x2d, bias, alg_id):
            seen.append((tuple(x2d.shape), alg_id, x2d[-1].abs().sum().item()))
            return super().matmul(packed, x2d, bias, alg_id)

    layer = pruned_linear()
    converted = sparse.Sparse24Linear(layer, Recording(), alg_id=7, keep_dense=False)
    out = converted(torch.randn(3, 5, 64))  # 15 tokens -> padded to 16 with a zero row
    assert seen == [((16, 64), 7, 0.0)]
    assert out.shape == (3, 5, 32)


def test_weight_dimensions_must_be_compressible():
    with pytest.raises(ValueError, match="10x64 weight cannot be compressed 2:4: both dimensions must be "
                                         "multiples of 16"):
        sparse.Sparse24Linear(torch.nn.Linear(64, 10), sparse.ReferenceBackend())


def timing(shape, tokens, dense, sparse_s, alg=0):
    return sparse.ShapeTiming(shape[0], shape[1], tokens, dense, sparse_s, alg, sparse_s)


def test_plan_converts_only_shapes_that_win_and_from_the_crossover_up():
    groups = {(8192, 8192): ["a.q", "b.q"], (2048, 2048): ["a.k"], (4096, 1024): ["a.v"]}
    timings = [
        timing((8192, 8192), 512, 1.0, 2.0, 1), timing((8192, 8192), 2048, 1.0, 0.9, 2),
        timing((8192, 8192), 8192, 1.0, 0.66, 3),
        timing((2048, 2048), 512, 1.0, 5.0), timing((2048, 2048), 8192, 1.0, 1.02),  # never by 5%
        timing((4096, 1024), 512, 1.0, 0.5), timing((4096, 1024), 8192, 1.0, 1.5),  # wins small only
    ]
    plans = {(p.out_features, p.in_features): p for p in sparse.plan_from_timings(groups, timings, 1.05)}
    big = plans[(8192, 8192)]
    assert big.convert and big.min_tokens == 2048 and big.alg_id == 3 and big.layers == ["a.q", "b.q"]
    assert big.best_speedup == pytest.approx(1 / 0.66)
    assert not plans[(2048, 2048)].convert and "best 0.98x" in plans[(2048, 2048)].reason
    assert not plans[(4096, 1024)].convert  # sparse must keep winning above the crossover
    rows = sparse.plan_rows(list(plans.values()))
    assert len(rows) == 7 and {r["shape"] for r in rows} == {"8192x8192", "2048x2048", "4096x1024"}


def test_unmeasured_shape_is_kept_dense():
    (p,) = sparse.plan_from_timings({(16, 16): ["x"]}, [], 1.05)
    assert not p.convert and p.reason == "not measured"


def test_time_shape_keeps_the_default_algorithm_when_the_searched_one_is_slower():
    class Searching(sparse.ReferenceBackend):
        def search(self, packed, x2d, bias):
            return 5

    answers = iter([1.0, 0.8, 0.9])  # dense, default algorithm, searched algorithm (s per call)
    calls = []

    def timer(fn, iters, warmup):
        calls.append(fn())
        return next(answers)

    t = sparse.time_shape(pruned_linear().weight.detach(), 24, Searching(), timer=timer)
    assert (t.alg_id, t.sparse_s, t.sparse_default_alg_s, t.dense_s) == (0, 0.8, 0.8, 1.0)
    assert t.speedup == pytest.approx(1.25)
    assert all(out.shape == (24, 32) for out in calls)


def test_candidates_are_exactly_the_2_4_layers():
    loaded = load_model(TINY, "fp32")
    assert sparse.candidate_layers(loaded.model) == {}  # dense random weights: nothing is 2:4
    prune_model(loaded.model, PruningSpec("magnitude", "2:4", include=("q_proj", "down_proj")))
    groups = sparse.candidate_layers(loaded.model)
    names = sorted(n for names in groups.values() for n in names)
    assert len(names) == 4 and all(n.endswith(("q_proj", "down_proj")) for n in names)
    assert sparse.candidate_layers(loaded.model, include=("q_proj",)).keys() == {(64, 64)}


def test_converted_model_gives_the_masked_dense_outputs():
    loaded = load_model(TINY, "fp32")
    prune_model(loaded.model, PruningSpec("magnitude", "2:4"))
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        reference = loaded.model(input_ids=ids).logits
    groups = sparse.candidate_layers(loaded.model)
    plans = [sparse.ShapePlan(o, i, names, True, 0, 16, 1.5, "test") for (o, i), names in groups.items()]
    converted = sparse.apply(loaded.model, plans, sparse.ReferenceBackend())
    assert len(converted) == 14
    assert sparse.call_counts(loaded.model) == {"layers": 14, "sparse_calls": 0, "dense_calls": 0}
    with torch.no_grad():
        out = loaded.model(input_ids=ids).logits  # 24 tokens >= 16: sparse path everywhere
    check = sparse.compare_outputs(reference, out)
    assert check["rel_l2"] < 1e-6 and check["top1_agreement"] == 1.0
    assert sparse.call_counts(loaded.model) == {"layers": 14, "sparse_calls": 14, "dense_calls": 0}
    sparse.reset_counts(loaded.model)
    with torch.no_grad():
        loaded.model(input_ids=ids[:1, :4])  # 4 tokens: under the crossover, dense path
    assert sparse.call_counts(loaded.model) == {"layers": 14, "sparse_calls": 0, "dense_calls": 14}


def test_sparse_kernel_names_are_recognised():
    names = {"sm90_xmma_sparse_gemm_f16f16_f16f32": 1.0, "ampere_fp16_s16816gemm_fp16_128x128": 2.0,
             "void cusparseLt::spmma_kernel<...>": 0.5}
    assert sparse.sparse_kernel_names(names) == ["sm90_xmma_sparse_gemm_f16f16_f16f32",
                                                 "void cusparseLt::spmma_kernel<...>"]


@pytest.mark.parametrize("precision,pattern,mode,expected", [
    ("bf16", "2:4", "auto", "no sparse kernel on cpu"),
    ("fp32", "2:4", "auto", "fp32: 2:4 sparse kernels run fp16/bf16 only"),
    ("nf4", "2:4", "auto", "nf4: bitsandbytes kernels are dense"),
    ("bf16", "4:8", "auto", "pattern 4:8 has no sparse tensor-core kernel"),
    ("bf16", "2:4", "off", "sparse kernels turned off"),
])
def test_study_says_why_a_pruned_config_runs_dense(precision, pattern, mode, expected):
    from types import SimpleNamespace

    from llm_energy.phases import pruning

    loaded = load_model(TINY, "bf16" if precision == "bf16" else "fp32")
    outcome = prune_model(loaded.model, PruningSpec("magnitude", pattern))
    run = SimpleNamespace(precision=precision, config_id="c")
    execution = pruning.sparse_execution(run, loaded, outcome, mode)
    assert execution.kernel == "dense" and expected in execution.note and execution.converted == []
    assert sparse.call_counts(loaded.model)["layers"] == 0  # nothing was swapped


def test_report_lists_the_kernels_of_pruned_configs(tmp_path):
    from llm_energy.phases import ranking
    from llm_energy.tables import rows as records

    records.record_config(tmp_path, "m__fp32", "m", "fp32", "ok")
    records.record_config(tmp_path, "m__bf16__wanda-2of4", "m", "bf16", "ok", pruning="wanda-2of4",
                            kernel="cusparselt", kernel_note="3 of 14 2:4 layers run cuSPARSELt")
    records.record_config(tmp_path, "m__fp32__magnitude-unstructured-50", "m", "fp32", "ok",
                            pruning="magnitude-unstructured-50")
    text = ranking.pruning_kernels_markdown(tmp_path)
    lines = text.splitlines()
    assert lines[0].startswith("**Kernels of the pruned configurations.**")
    assert lines[1:] == ["- m__bf16__wanda-2of4: cusparselt — 3 of 14 2:4 layers run cuSPARSELt",
                         "- m__fp32__magnitude-unstructured-50: dense"]


def tiny_2_4():
    loaded = load_model(TINY, "fp32")
    prune_model(loaded.model, PruningSpec("magnitude", "2:4"))
    groups = sparse.candidate_layers(loaded.model)
    plans = [sparse.ShapePlan(o, i, names, True, 0, 8, 1.5, "test") for (o, i), names in groups.items()]
    ids = torch.randint(0, 100, (2, 8))

    def forward():
        with torch.no_grad():
            return loaded.model(input_ids=ids).logits

    return loaded, plans, forward


def test_conversion_is_kept_when_outputs_match_the_dense_model():
    loaded, plans, forward = tiny_2_4()
    converted, check = sparse.convert_and_verify(loaded.model, plans, forward, sparse.ReferenceBackend(),
                                                 check_kernels=False)
    assert len(converted) == 14 and check.ok and check.sparse_calls == 14 and check.rel_l2 < 1e-6
    assert sparse.call_counts(loaded.model)["layers"] == 14


def test_conversion_is_reverted_when_the_kernel_gives_other_outputs():
    class Wrong(sparse.ReferenceBackend):
        def matmul(self, packed, x2d, bias, alg_id):
            return super().matmul(packed, x2d, bias, alg_id) * 1.5

    loaded, plans, forward = tiny_2_4()
    reference = forward()
    converted, check = sparse.convert_and_verify(loaded.model, plans, forward, Wrong(), check_kernels=False)
    assert converted == [] and not check.ok and "outputs differ from the dense model" in check.reason
    assert sparse.call_counts(loaded.model)["layers"] == 0  # plain linear layers again
    assert all(type(m) is torch.nn.Linear for n, m in loaded.model.named_modules() if n.endswith("q_proj"))
    torch.testing.assert_close(forward(), reference)


def test_conversion_is_reverted_when_the_probe_is_too_small_for_the_sparse_path():
    loaded, plans, forward = tiny_2_4()
    for p in plans:
        p.min_tokens = 10_000
    converted, check = sparse.convert_and_verify(loaded.model, plans, forward, sparse.ReferenceBackend(),
                                                 check_kernels=False)
    assert converted == [] and "never reached the sparse path" in check.reason
