"""The pruning phase on fine-tuned targets: merge then prune, a quantized round trip that keeps N:M
exact, recovery that keeps the mask, and targets named by config id."""

import pytest
import torch

from llm_energy.config import (
    FinetuneSpec,
    ModelSettings,
    PruningSpec,
    RecoverySettings,
    StudyValidationError,
    TaskSettings,
)
from llm_energy.data.tasks import load_task_data
from llm_energy.methods.lora_training import finetune, load_adapter
from llm_energy.methods.sparsify import prune_model
from llm_energy.models.loading import load_model, precision_support
from llm_energy.phases import pruning
from llm_energy.phases.evaluation import ConfigRun
from llm_energy.tables import store as results

TINY = ModelSettings(name="tiny-random-llama")
QUICK = FinetuneSpec(epochs=1, learning_rate=5e-3, batch_size=4, max_train_items=8, max_eval_items=4,
                     dropout=0.0)


def make_run(tmp_path, root, precision="fp32"):
    return ConfigRun.from_parameters(study_dir=str(tmp_path), config_id="",
                                     model={"name": "tiny-random-llama"}, precision=precision, device="cpu",
                                     tasks={"rca": {"max_items": 4}, "qa": {"max_items": 4}},
                                     energy={"idle_seconds": 0}, seed=0, base_dir=str(root))


def train_adapter(precision, out_dir):
    """A LoRA adapter that actually moved (a fresh one is a no-op: B starts at zero)."""
    train = load_task_data("rca", TaskSettings(), split="train")
    valid = load_task_data("rca", TaskSettings(), split="validation")
    loaded = load_model(TINY, precision)
    finetune(loaded, train.items, valid.items, QUICK, None, out_dir, label_set=train.labels, progress=False)
    return out_dir


def logits(model):
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def fp32_adapter(tmp_path_factory):
    return train_adapter("fp32", tmp_path_factory.mktemp("adapter") / "fp32")


def test_merge_then_prune_equals_pruning_the_merged_dense_model(tmp_path, root, fp32_adapter):
    spec = PruningSpec("magnitude", sparsity=0.5)
    run = make_run(tmp_path, root).with_config_id("tiny__fp32__lora__magnitude-unstructured-50")
    pruned = pruning.prune(run, spec, [], str(fp32_adapter))
    assert pruned.after_quantization == [] and "merged" in pruned.loaded.weights_origin
    manual = load_model(TINY, "fp32")
    merged = load_adapter(manual, fp32_adapter).merge_and_unload()
    prune_model(merged, spec)
    assert torch.allclose(logits(pruned.loaded.model), logits(merged), atol=1e-6)
    base_only = load_model(TINY, "fp32")
    prune_model(base_only.model, spec)
    assert not torch.allclose(logits(base_only.model), logits(merged), atol=1e-4)  # the adapter mattered
    assert pruned.outcome.measured_sparsity == pytest.approx(0.5, abs=0.01)


def test_nf4_qlora_target_round_trips_with_nm_exact(tmp_path, root):
    reason = precision_support("nf4", "cpu")
    if reason:
        pytest.skip(reason)
    adapter = train_adapter("nf4", tmp_path / "qlora")
    run = make_run(tmp_path, root, "nf4").with_config_id("tiny__nf4__lora__wanda-2of4")
    texts = ["link down at the core router after a power cut"] * 4
    pruned = pruning.prune(run, PruningSpec("wanda", "2:4", calibration_samples=4), texts, str(adapter))
    assert pruned.loaded.precision == "nf4"
    assert ("dequantized from nf4" in pruned.loaded.weights_origin
            and "quantized to nf4" in pruned.loaded.weights_origin)
    checks = pruned.after_quantization
    assert len(checks) == len(pruned.outcome.layers) == 14
    assert all(c.verified_nm is True for c in checks)  # 2:4 still exact in the nf4 weights
    assert all(c.measured_sparsity >= 0.5 for c in checks)


def test_a_w8a8_lora_target_is_merged_pruned_requantized_and_recovered_at_w8a8(tmp_path, root):
    """An adapter trained on the int8 base: merged into the dequantized weights, pruned, quantized back
    to w8a8 with its 2:4 pattern intact; a recovery LoRA then trains on the pruned int8 layers
    (their input gradients in int8) and cannot move their zeros (the int8 weights get no gradient)."""
    adapter = train_adapter("w8a8", tmp_path / "w8a8-lora")
    run = make_run(tmp_path, root, "w8a8").with_config_id("tiny__w8a8__lora__magnitude-2of4")
    pruned = pruning.prune(run, PruningSpec("magnitude", "2:4"), [], str(adapter))
    assert pruned.loaded.precision == "w8a8"
    assert ("dequantized from w8a8" in pruned.loaded.weights_origin
            and "merged" in pruned.loaded.weights_origin)
    assert (len(pruned.after_quantization) == 14
            and all(c.verified_nm is True for c in pruned.after_quantization))
    settings = RecoverySettings(epochs=1, learning_rate=5e-3, batch_size=4, max_train_items=8,
                                max_eval_items=4)
    recovery = pruning.recover(run, pruned, settings, None, adapter="lora")
    assert recovery is not None and all(c.verified_nm is True for c in recovery.checks)
    assert results.read_table(tmp_path, "training")["precision"].tolist() == ["w8a8"]


def test_recovery_keeps_the_pruned_weights_and_records_its_epochs(tmp_path, root):
    run = make_run(tmp_path, root).with_config_id("tiny-random-llama__fp32__magnitude-2of4")
    pruned = pruning.prune(run, PruningSpec("magnitude", "2:4"), [])
    before = {layer.name: layer.measured_sparsity for layer in pruned.outcome.layers}
    settings = RecoverySettings(epochs=1, learning_rate=5e-3, batch_size=4, max_train_items=8,
                                max_eval_items=4)
    recovery = pruning.recover(run, pruned, settings, None)
    assert recovery.run.config_id == "tiny-random-llama__fp32__magnitude-2of4__recovered"
    assert ([c.measured_sparsity for c in recovery.checks]
            == pytest.approx([before[c.name] for c in recovery.checks]))
    assert all(c.verified_nm is True for c in recovery.checks)
    training = results.read_table(tmp_path, "training")
    assert list(training["phase"]) == ["recovery"] and training["config_id"].iloc[0] == recovery.run.config_id
    configs = results.read_table(tmp_path, "configs").set_index("config_id")
    assert configs.loc[recovery.run.config_id, "adapter"] == "recovery"
    layers = results.read_table(tmp_path, "pruning_layers")
    mine = layers[layers["config_id"] == recovery.run.config_id]
    assert len(mine) == 14 and (mine["verified_nm_after"] == "yes").all()


def test_recovery_at_fp4_is_skipped_with_its_reason(tmp_path, root):
    if precision_support("fp4", "cpu"):
        pytest.skip("fp4 does not run here")
    run = make_run(tmp_path, root, "fp4").with_config_id("tiny-random-llama__fp4__magnitude-2of4")
    pruned = pruning.prune(run, PruningSpec("magnitude", "2:4"), [])
    assert pruning.recover(run, pruned, RecoverySettings(), None) is None
    row = results.read_table(tmp_path, "configs").set_index("config_id").loc[run.config_id + "__recovered"]
    assert row["status"] == "skipped" and "no recovery fine-tuning at fp4" in row["reason"]


@pytest.mark.parametrize("target,message", [
    ("tiny-random-llama__int8__lora", "no adapter is trained at int8"),
    ("tiny-random-llama__fp32__lora__wanda-2of4", "pruned configs are not pruned again"),
    ("gpt-9__fp32", "names model 'gpt-9'"),
])
def test_a_target_the_study_does_not_produce_is_refused(root, tmp_path, target, message):
    from llm_energy.config import load_study

    text = (root / "params" / "smoke.yaml").read_text().replace("targets: [tiny-random-llama__fp32__lora]",
                                                                f'targets: ["{target}"]')
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(StudyValidationError, match=message) as err:
        load_study(path)
    assert target in str(err.value)


def test_a_fine_tuned_target_by_config_id_is_planned_with_its_adapter(root, tmp_path):
    from llm_energy.config import load_study
    from llm_energy.runner import study as runner

    text = (root / "params" / "smoke.yaml").read_text().replace("targets: [tiny-random-llama__fp32__lora]",
                                                                'targets: ["tiny-random-llama__nf4__lora"]')
    path = tmp_path / "study.yaml"
    path.write_text(text)
    jobs, _ = runner.expand(load_study(path), tmp_path / "out", root / "params", "cpu")
    pruned = [j for j in jobs if j.phase == "pruning"]
    assert [j.config_id for j in pruned] == ["tiny-random-llama__nf4__lora__magnitude-unstructured-50",
                                             "tiny-random-llama__nf4__lora__wanda-2of4"]
    assert all(j.parameters["adapter"].endswith("adapters/tiny-random-llama__nf4__lora") for j in pruned)
    assert all(j.parameters["adapter_name"] == "lora" for j in pruned)
