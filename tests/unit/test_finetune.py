"""LoRA / QLoRA fine-tuning on the tiny random Llama (CPU), with a fake energy meter."""

import math

import pytest

from llm_energy.config import EnergySettings, FinetuneSpec, ModelSettings, TaskSettings
from llm_energy.data.tasks import load_task_data
from llm_energy.items import QAItem
from llm_energy.measure.meter import ComponentReading, EnergyMeter
from llm_energy.methods.lora_training import (
    ADAPTER_FILE,
    IGNORE_INDEX,
    _contiguous_head_input,
    build_examples,
    finetune,
    load_adapter,
    mean_answer_nll,
)
from llm_energy.methods.scoring import DEFAULT_RCA_PROMPT, encode_pair, score_continuations
from llm_energy.models.loading import load_model
from llm_energy.models.quant8 import W8A8Linear

TINY = ModelSettings(name="tiny-random-llama")
OVERFIT = dict(learning_rate=5e-3, epochs=2, batch_size=8, max_length=256, dropout=0.0)


@pytest.fixture(scope="module")
def rca():
    """Eight training items (the overfit set) and the label set."""
    data = load_task_data("rca", TaskSettings(split="train", max_items=8))
    return data.items, data.labels


class TickClock:
    """Each reading advances 1.5 s, so every window lasts exactly 1.5 s."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.5
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeSource:
    """A 10 W CPU estimate that remembers the windows it was asked to measure."""

    name = "fake"

    def __init__(self, clock: TickClock):
        self.clock, self.windows = clock, []

    def begin(self, window):
        self.windows.append(window)

    def end(self):
        return {"cpu": ComponentReading(10.0 * 1.5, "codecarbon:cpu_load")}

    def close(self):
        pass


def fake_meter():
    clock = TickClock()
    source = FakeSource(clock)
    settings = EnergySettings(idle_seconds=0, carbon_intensity_g_per_kwh=100.0)
    return EnergyMeter(settings, sources=[source], clock=clock, sleep=clock.sleep), source


def test_spec_is_validated():
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        FinetuneSpec(rank=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        FinetuneSpec(dropout=1.0)
    with pytest.raises(ValueError, match="task must be 'rca' or 'qa'"):
        FinetuneSpec(task="summarise")
    assert FinetuneSpec(target_modules=["q_proj"]).target_modules == ("q_proj",)


def test_examples_are_the_scoring_prompt_plus_gold_label(rca, tiny_model):
    items, labels = rca
    examples = build_examples(items, tiny_model.tokenizer, FinetuneSpec(), labels)
    label_list = ", ".join(label.replace("_", " ") for label in labels)
    for item, example in zip(items, examples):
        prompt = DEFAULT_RCA_PROMPT.format(ticket=item.ticket, labels=label_list)
        ctx, cont = encode_pair(tiny_model.tokenizer, prompt, " " + item.root_cause.replace("_", " "))
        assert example.input_ids == tuple(ctx + cont) and example.n_prompt_tokens == len(ctx)
        assert example.labels == (IGNORE_INDEX,) * len(ctx) + tuple(cont)


def test_qa_examples():
    from llm_energy.models.loading import load_tokenizer

    tokenizer, _ = load_tokenizer(TINY)
    item = QAItem(id="q1", question="What does RSRP measure?", choices=("Power", "Delay"), answer=0)
    (example,) = build_examples([item], tokenizer, FinetuneSpec(task="qa"))
    assert tokenizer.decode(example.input_ids) == "Question: What does RSRP measure?\nAnswer: Power"
    assert tokenizer.decode(example.answer_ids) == " Power"


def test_eval_loss_is_the_scored_loglikelihood(rca, tiny_model):
    """The training loss is the quantity evaluation scores: -log p(gold label | prompt) per token."""
    items, labels = rca
    examples = build_examples(items, tiny_model.tokenizer, FinetuneSpec(), labels)
    pad = tiny_model.tokenizer.pad_token_id
    label_list = ", ".join(label.replace("_", " ") for label in labels)
    nll = sum(
        -score_continuations(tiny_model.model, tiny_model.tokenizer,
                             DEFAULT_RCA_PROMPT.format(ticket=i.ticket, labels=label_list),
                             [" " + i.root_cause.replace("_", " ")]).loglik[0]
        for i in items
    )
    n_tokens = sum(len(e.answer_ids) for e in examples)
    # Batched with left padding must equal the unpadded one-by-one scores.
    assert (mean_answer_nll(tiny_model.model, examples, pad, batch_size=3)
            == pytest.approx(nll / n_tokens, rel=1e-4))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "w8a8", "int8", "nf4"])
def test_lora_overfits_saves_and_reloads(precision, rca, tmp_path):
    items, labels = rca
    loaded = load_model(TINY, precision)
    spec = FinetuneSpec(**OVERFIT)
    examples = build_examples(items, loaded.tokenizer, spec, labels)
    pad = loaded.tokenizer.pad_token_id
    # Score the base model first, as a study does: bitsandbytes may repack 4-bit weights for its
    # CPU inference kernel, which has no backward; fine-tuning must still learn afterwards.
    base_loss = mean_answer_nll(loaded.model, examples, pad)
    meter, source = fake_meter()
    result = finetune(loaded, list(items) * 4, items, spec, meter, tmp_path / "adapter", labels,
                      progress=False)

    first, second = result.epochs
    assert second.train_loss < first.train_loss
    assert all(math.isfinite(e.eval_loss) for e in result.epochs)
    assert (first.epoch, second.epoch) == (1, 2)
    assert first.n_examples == 32 and first.n_tokens > 32

    # One window per epoch and one for its eval loss after it; each epoch carries its windows' numbers.
    assert source.windows == ["finetune:epoch1", "finetune:eval1", "finetune:epoch2", "finetune:eval2"]
    for epoch in result.epochs:
        assert epoch.duration_s == pytest.approx(1.5) and epoch.eval_record.duration_s == pytest.approx(1.5)
        assert epoch.energy_kwh == pytest.approx(15.0 / 3.6e6)
        assert epoch.emissions_kg == pytest.approx(epoch.energy_kwh * 0.1)
        assert epoch.energy_method == "codecarbon:cpu_load"

    assert (result.adapter_dir / ADAPTER_FILE).is_file()
    assert 0 < result.trainable_parameters < result.total_parameters / 10
    assert "Lora" not in repr(result)  # the model stays out of the repr

    assert second.eval_loss < first.eval_loss < base_loss
    if precision == "w8a8":  # the adapter sits on the int8 layers, which gave their input gradients
        q_proj = result.model.get_base_model().model.layers[0].self_attn.q_proj
        assert isinstance(q_proj.base_layer, W8A8Linear)

    # In another process: a fresh base model plus the saved adapter scores like the trained one.
    reloaded = load_adapter(load_model(TINY, precision), result.adapter_dir)
    reloaded_loss = mean_answer_nll(reloaded, examples, pad)
    assert reloaded_loss == pytest.approx(mean_answer_nll(result.model, examples, pad), rel=1e-5)
    assert reloaded_loss == pytest.approx(second.eval_loss, rel=1e-3)


def test_the_output_projection_reads_a_contiguous_input_while_training(tiny_model):
    """Logits at the last positions only are a strided slice of the hidden states; torch's matmul then
    copies the vocabulary projection once per example when autograd needs the slice."""
    import torch

    seen = []
    head = tiny_model.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda _module, args, _out: seen.append(args[0].is_contiguous()))
    ids = torch.randint(0, 100, (2, 7))
    try:
        tiny_model.model(input_ids=ids, logits_to_keep=3)
        with _contiguous_head_input(tiny_model.model):
            with_hook = tiny_model.model(input_ids=ids, logits_to_keep=3).logits
        without = tiny_model.model(input_ids=ids, logits_to_keep=3).logits
    finally:
        hook.remove()
    assert seen == [False, True, False]  # the pre-hook is removed on leaving
    assert torch.equal(with_hook, without)


def test_without_meter_energy_is_missing_and_runs_are_seeded(rca, tmp_path):
    items, labels = rca
    spec = FinetuneSpec(**{**OVERFIT, "epochs": 1, "dropout": 0.05})
    runs = [finetune(load_model(TINY, "fp32"), items, items, spec, None, tmp_path / f"run{i}", labels,
                     progress=False)
            for i in range(2)]
    (epoch,) = runs[0].epochs
    assert math.isnan(epoch.energy_kwh) and epoch.energy_method == "none" and epoch.duration_s > 0
    assert runs[0].epochs[0].train_loss == runs[1].epochs[0].train_loss


def test_empty_training_split(rca, tiny_model, tmp_path):
    _, labels = rca
    with pytest.raises(ValueError, match="no training items for task 'rca': the training split is empty"):
        finetune(tiny_model, [], [], FinetuneSpec(), None, tmp_path, labels)


def test_unknown_target_module_lists_the_linear_modules(rca, tmp_path):
    items, labels = rca
    loaded = load_model(TINY, "fp32")
    spec = FinetuneSpec(target_modules=("q_proj", "query_key_value"))
    with pytest.raises(ValueError, match=r"\['query_key_value'\] not found.*linear modules are: "
                                         r".*k_proj.*q_proj"):
        finetune(loaded, items, items, spec, None, tmp_path, labels)
    assert not any("lora" in name for name, _ in loaded.model.named_modules())  # left untouched


def test_max_length_shorter_than_an_example(rca, tiny_model, tmp_path):
    items, labels = rca
    n_prompt = build_examples(items[:1], tiny_model.tokenizer, FinetuneSpec(), labels)[0].n_prompt_tokens
    spec = FinetuneSpec(max_length=32)
    with pytest.raises(ValueError, match=rf"item {items[0].id}: prompt is {n_prompt} tokens .* "
                                         r"max_length=32"):
        finetune(tiny_model, items, items, spec, None, tmp_path, labels)


def test_fp4_is_refused(rca, tmp_path):
    items, labels = rca
    loaded = load_model(TINY, "fp4")
    with pytest.raises(ValueError, match="cannot fine-tune at precision 'fp4'.*nf4"):
        finetune(loaded, items, items, FinetuneSpec(), None, tmp_path, labels)


def test_load_adapter_needs_an_adapter_folder(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match=f"holds no {ADAPTER_FILE}"):
        load_adapter(tiny_model, tmp_path)
