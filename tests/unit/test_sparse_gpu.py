"""2:4 sparse kernels on a CUDA GPU (skipped, with the reason, anywhere else).

Imports nothing beyond torch, transformers and llm_energy.models.sparse_kernels/prune, so it runs on a bare
GPU image from a checkout: ``PYTHONPATH=lib python3 -m pytest -o addopts="" tests/unit/test_sparse_gpu.py``
(tools/gpu_check.sh does exactly that).
"""

import pytest
import torch
import torch.nn.functional as F

from llm_energy.config import PruningSpec
from llm_energy.methods.sparsify import prune_model
from llm_energy.models import sparse_kernels as sparse

REASON = sparse.support_reason("cuda" if torch.cuda.is_available() else "cpu", torch.float16)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None,
                                                  reason=f"needs 2:4 sparse kernels: {REASON}")]


def pruned_weight(out_features, in_features, dtype=torch.float16):
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=dtype)
    prune_model(torch.nn.ModuleDict({"q_proj": layer}), PruningSpec("magnitude", "2:4", include=("q_proj",)))
    return layer


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [4096, 1002])  # 1002 = 8 * 125 + 2: the padding branch runs
def test_cusparselt_layer_matches_dense_and_runs_a_sparse_kernel(dtype, tokens):
    layer = pruned_weight(1024, 2048, dtype)
    converted = sparse.Sparse24Linear(layer, sparse.CusparseltBackend(), keep_dense=False)
    x = torch.randn(2, tokens // 2, 2048, device="cuda", dtype=dtype)
    with torch.inference_mode():
        expected = F.linear(x, layer.weight)
        kernels = sparse.kernels_run(lambda: converted(x))
        got = converted(x)
    assert tokens % sparse.TOKEN_MULTIPLE == 0 or converted.sparse_calls > 0  # padded, still sparse
    assert got.shape == expected.shape
    assert sparse.compare_outputs(expected, got)["rel_l2"] < 1e-2
    assert sparse.sparse_kernel_names(kernels), f"no sparse kernel among {list(kernels)[:8]}"


def test_time_shape_measures_both_paths_on_the_gpu():
    t = sparse.time_shape(pruned_weight(4096, 4096).weight.detach(), 4096, iters=5, warmup=2)
    assert t.dense_s > 0 and t.sparse_s > 0 and t.sparse_default_alg_s >= t.sparse_s


def test_convert_and_verify_on_a_small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=4, vocab_size=1024)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).half().eval()
    prune_model(model, PruningSpec("magnitude", "2:4"))
    ids = torch.randint(0, 1024, (4, 512), device="cuda")

    def forward():
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False).logits

    plans = sparse.plan(model, [2048], min_speedup=0.0)  # every shape, whatever the timing says
    converted, check = sparse.convert_and_verify(model, plans, forward)
    assert check.ok, check.reason
    assert len(converted) == 2 * 7 and check.sparse_calls == 14 and check.sparse_kernels
