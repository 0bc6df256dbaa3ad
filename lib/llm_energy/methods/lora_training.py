"""Parameter-efficient fine-tuning (LoRA, QLoRA) with one energy window per epoch.

The model learns exactly what it is later scored on: the task's scoring prompt followed by the gold
answer read as words (RCA: ``DEFAULT_RCA_PROMPT`` + ``" " + label_text(root_cause)``; QA:
``DEFAULT_QA_PROMPT`` + ``" " + correct choice``), tokenized the way :mod:`llm_energy.methods.scoring`
tokenizes a context and its continuation, with the loss on the answer tokens only.

Precisions: fp32, bf16, fp16 train plain LoRA on the dense model (the adapter's weights and its
optimizer state stay fp32: peft keeps adapters fp32 on a half-precision base); int8 (LLM.int8) and
nf4 (QLoRA) go through ``peft.prepare_model_for_kbit_training`` first (no gradient checkpointing);
w8a8 trains LoRA on this package's int8 layers, whose backward gives the input gradient as an int8
product (:class:`llm_energy.models.quant8.W8A8LinearFunction`). fp4 is not fine-tuned. int8 and nf4
also train on CPU with bitsandbytes 0.50, whose CPU backend has the backward of the int8 and 4-bit
matmuls; on AVX512-BF16 CPUs its packed 4-bit inference layout has none, so it is switched off
while training (:func:`set_cpu_4bit_packing`).

Fine-tuning injects LoRA layers into ``loaded.model`` in place: score the base model before, or
load a fresh one for a baseline.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..config import FinetuneSpec
from ..items import QAItem, RCAItem, label_text
from ..measure.flops import forward_gflop
from .scoring import DEFAULT_QA_PROMPT, DEFAULT_RCA_PROMPT, choice_block, encode_pair

if TYPE_CHECKING:
    from ..measure.meter import EnergyMeter
    from ..models.loading import LoadedModel

FINETUNE_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "w8a8", "int8", "nf4")
KBIT_PRECISIONS: tuple[str, ...] = ("int8", "nf4")
ADAPTER_FILE = "adapter_model.safetensors"
IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt and padding positions)
# A training step's work in forwards: the forward, then the backward's gradient with respect to every
# layer's input (one more forward's worth, through every layer down to the first adapted one). The
# frozen base weights get no gradient, so the third forward's worth that full training spends on
# weight gradients is only the adapters' here (rank 8 on q and v: well under 1% of the model).
TRAINING_FORWARDS = 2.0


@dataclass(frozen=True)
class TrainingExample:
    """One tokenized example: prompt tokens then answer tokens (no special tokens, as in scoring)."""

    item_id: str
    input_ids: tuple[int, ...]
    n_prompt_tokens: int

    @property
    def answer_ids(self) -> tuple[int, ...]:
        return self.input_ids[self.n_prompt_tokens :]

    @property
    def labels(self) -> tuple[int, ...]:
        return (IGNORE_INDEX,) * self.n_prompt_tokens + self.answer_ids


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float  # mean answer-token NLL over the epoch's training steps (nats per token)
    eval_loss: float  # mean answer-token NLL on the evaluation items after the epoch; nan if none
    duration_s: float  # training time of the epoch (the energy window; evaluation not included)
    energy_kwh: float  # nan without a meter
    emissions_kg: float  # nan without a meter
    energy_method: str  # "none" without a meter
    n_examples: int  # training examples seen in the epoch
    n_tokens: int  # non-padding tokens fed to the model in the epoch (forward and backward)
    gflop: float = float("nan")  # the epoch's useful work (training_gflop); nan when not counted
    # the epoch's EnergyRecord (None without a meter)
    record: Any = field(default=None, repr=False, compare=False)
    # the eval loss's own window after the epoch's (None without a meter or eval items)
    eval_record: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class FinetuneResult:
    epochs: tuple[EpochRecord, ...]
    adapter_dir: Path
    trainable_parameters: int
    total_parameters: int
    model: Any = field(repr=False, compare=False)  # the peft-wrapped model, in eval mode

    @property
    def final(self) -> EpochRecord:
        return self.epochs[-1]

    @property
    def energy_kwh(self) -> float:
        return sum(e.energy_kwh for e in self.epochs)


# --------------------------------------------------------------------------------------------------
# Examples


def _sample(items: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """A seeded sample in the original order, so a capped run does not see only the first items."""
    items = list(items)
    if limit is None or limit >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def sampled_examples(items: Sequence[Any], tokenizer: Any, spec: FinetuneSpec, limit: int | None,
                     label_set: Sequence[str] = ()) -> list[TrainingExample]:
    """The seeded sample of ``items`` (at most ``limit``) a run trains or evaluates on, tokenized."""
    return build_examples(_sample(items, limit, spec.seed), tokenizer, spec, label_set)


def _prompt_and_answer(item: Any, task: str, label_list: str, labels: Sequence[str]) -> tuple[str, str]:
    if task == "rca":
        if not isinstance(item, RCAItem):
            raise TypeError(f"task 'rca' expects RCAItem items, got {type(item).__name__}")
        if item.root_cause not in labels:
            raise ValueError(f"item {item.id}: root cause {item.root_cause!r} is not in the label set "
                             f"{list(labels)}")
        return (DEFAULT_RCA_PROMPT.format(ticket=item.ticket, labels=label_list),
                " " + label_text(item.root_cause))
    if not isinstance(item, QAItem):
        raise TypeError(f"task 'qa' expects QAItem items, got {type(item).__name__}")
    prompt = DEFAULT_QA_PROMPT.format(question=item.question, choices=choice_block(item.choices))
    return prompt, " " + item.choices[item.answer]


def build_examples(items: Sequence[Any], tokenizer: Any, spec: FinetuneSpec,
                   label_set: Sequence[str] = ()) -> list[TrainingExample]:
    """Tokenize prompt + gold answer per item; raise when an example does not fit ``max_length``.

    ``label_set`` is the RCA label set (``TaskData.labels``, snake_case) listed in the prompt; the
    QA task ignores it.
    """
    if spec.task == "rca" and not label_set:
        raise ValueError("the rca task needs the label set listed in the prompt (pass TaskData.labels)")
    label_list = ", ".join(label_text(label) for label in label_set)
    examples = []
    for item in items:
        prompt, answer = _prompt_and_answer(item, spec.task, label_list, label_set)
        # The same split into context and continuation tokens as scoring, so the trained tokens
        # are the scored ones.
        prompt_ids, answer_ids = encode_pair(tokenizer, prompt, answer)
        if not prompt_ids or not answer_ids:
            raise ValueError(f"item {item.id}: prompt or answer encodes to no tokens")
        n_tokens = len(prompt_ids) + len(answer_ids)
        if n_tokens > spec.max_length:
            # Truncating would cut the answer (it comes last) and silently train on nothing.
            raise ValueError(
                f"item {item.id}: prompt is {len(prompt_ids)} tokens and answer {len(answer_ids)}, "
                f"{n_tokens} in all, longer than max_length={spec.max_length}; raise max_length "
                "or shorten the item"
            )
        examples.append(TrainingExample(item.id, tuple(prompt_ids) + tuple(answer_ids), len(prompt_ids)))
    return examples


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _collate(examples: Sequence[TrainingExample], pad_id: int) -> dict[str, Any]:
    import torch

    # Left padding puts every answer at the end of its row, so the model needs logits for the last
    # few positions only: a full-vocabulary head over every prompt token would be most of the work.
    width = max(len(e.input_ids) for e in examples)
    answer_width = max(len(e.answer_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        start = width - len(example.input_ids)
        ids[row, start:] = torch.tensor(example.input_ids)
        mask[row, start:] = 1
        labels[row, start + example.n_prompt_tokens :] = torch.tensor(example.answer_ids)
    # Positions count real tokens only, as when scoring an unpadded prompt.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "labels": labels, "answer_width": answer_width}


def _answer_nll(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """(summed NLL of the answer tokens as a tensor, number of answer tokens) for one batch."""
    import torch

    device = next(model.parameters()).device
    keep = batch["answer_width"] + 1  # logits at position t predict token t + 1
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        position_ids=batch["position_ids"].to(device),
        use_cache=False,
        logits_to_keep=keep,
    )
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, -batch["answer_width"] :].to(device)
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, int((targets != IGNORE_INDEX).sum())


def mean_answer_nll(model: Any, examples: Sequence[TrainingExample], pad_token_id: int,
                    batch_size: int = 8) -> float:
    """Mean NLL per answer token (nats), no gradient; nan for no examples."""
    import torch

    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                nll, n = _answer_nll(model, _collate(examples[start : start + batch_size], pad_token_id))
                total += float(nll)
                count += n
    finally:
        model.train(was_training)
    return total / count


# --------------------------------------------------------------------------------------------------
# Model preparation


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the model's linear layers (bitsandbytes layers subclass nn.Linear; W8A8 layers
    stand in for them)."""
    import torch

    from ..models.quant8 import W8A8Linear

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if name and isinstance(module, (torch.nn.Linear, W8A8Linear))})


def _check_target_modules(model: Any, target_modules: Sequence[str]) -> None:
    names = [name for name, _ in model.named_modules()]
    # peft matches a target by its full name or a dotted suffix, and ignores targets that match
    # nothing when another one matches: check each one here.
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(
            f"target module(s) {missing} not found in the model; its linear modules are: "
            + ", ".join(linear_module_names(model))
        )


def set_cpu_4bit_packing(model: Any, enabled: bool) -> None:
    """Allow or forbid bitsandbytes' packed CPU layout for 4-bit weights.

    On a CPU with AVX512-BF16, bitsandbytes (0.49+) repacks a 4-bit weight for a faster inference
    kernel the first time its layer runs in eval mode without gradients, and never unpacks it when
    training resumes; that kernel (gemv_4bit) has no backward, so gradients through the frozen
    layers silently become zero and the adapter stops learning. Forbidding it also unpacks weights
    packed by earlier evaluations (e.g. scoring the base model before fine-tuning).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if enabled:
            module.support_avx512bf16_for_cpu = bnb.functional.has_avx512bf16()
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _unpack_cpu_4bit(module.weight.data, state)


def _unpack_cpu_4bit(packed: Any, state: Any) -> tuple[Any, Any]:
    import torch
    from bitsandbytes import functional as bnb_functional

    qweight, state = bnb_functional._convert_weight_packed_for_cpu_inverse(packed, state)
    if not state.nested and state.absmax.dim() == 2:
        # bitsandbytes 0.50 restores the weight but leaves a non-nested absmax in the packed layout
        # ([K / blocksize, N], bf16) while dequantization reads it flat in [N, K / blocksize] order:
        # every layer wider than one block would get the wrong scales. The bf16 rounding of the
        # scales cannot be undone; it is the rounding the packed inference kernel uses too.
        state.absmax = state.absmax.T.reshape(-1).to(torch.float32).contiguous()
    return qweight, state


def _check_precision(precision: str) -> None:
    if precision not in FINETUNE_PRECISIONS:
        raise ValueError(
            f"cannot fine-tune at precision {precision!r}: fine-tuning supports "
            f"{', '.join(FINETUNE_PRECISIONS)} (4-bit QLoRA uses nf4; fp4 is inference only)"
        )


def _lora_config_for(model: Any, config: Any) -> Any:
    """``config`` able to put LoRA on the model's W8A8 layers too: peft wraps only the layer types it
    knows, and takes others through its custom-module mapping (``LoraConfig._register_custom_module``,
    documented as experimental); peft's own ``lora.Linear`` wraps a W8A8 layer as it is, since it only
    calls the base layer and reads its in_features and out_features."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from ..models.quant8 import W8A8Linear

    if any(isinstance(m, W8A8Linear) for m in model.modules()):
        config._register_custom_module({W8A8Linear: LoraLinear})
    return config


@contextlib.contextmanager
def _w8a8_weights_shown(model: Any) -> Iterator[None]:
    """While peft puts adapters on the model: each W8A8 layer shows its int8 weight as ``weight``.
    peft places a new adapter on its base layer's device (and dtype, unless an integer one), read
    from the base's ``weight`` or else its first parameter, and a W8A8 layer without a bias has
    neither (its weight is the buffer ``weight_int8``)."""
    import warnings

    from ..models.quant8 import W8A8Linear

    layers = [m for m in model.modules() if isinstance(m, W8A8Linear) and "weight" not in vars(m)]
    for layer in layers:
        layer.weight = layer.weight_int8
    try:
        with warnings.catch_warnings():  # peft warns of each layer type it does not know; this one is handled
            warnings.filterwarnings("ignore", message=r"Unsupported layer type .*W8A8Linear")
            yield
    finally:
        for layer in layers:
            del layer.weight


@contextlib.contextmanager
def _contiguous_head_input(model: Any) -> Iterator[None]:
    """While training: the output projection gets its input as a contiguous tensor.

    The model computes logits at the last positions only (``logits_to_keep``), a strided slice of
    the hidden states. torch's matmul folds a [batch, positions, hidden] input into one matrix
    product only when it can do so without copying an input that autograd needs; else it runs a
    batched product with the weight expanded to every row of the batch, i.e. a copy of the
    vocabulary projection per example (8 x 49152 x 576 for SmolLM2 at batch 8, forward and
    backward), which was 13% of a bf16 training step on a 2-core CPU. A contiguous slice folds."""
    head = model.get_output_embeddings()
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _wrap_with_lora(loaded: LoadedModel, spec: FinetuneSpec) -> Any:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    model = loaded.model
    if isinstance(model, PeftModel):
        raise ValueError(f"{loaded.name} at {loaded.precision} already carries a LoRA adapter; load a fresh "
                         "base model")
    _check_target_modules(model, spec.target_modules)
    if loaded.precision == "nf4":
        set_cpu_4bit_packing(model, enabled=False)
    if loaded.precision in KBIT_PRECISIONS:
        # No gradient checkpointing: these models fit in memory, and recomputing activations
        # would add energy that belongs to the memory trade-off, not to the precision.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(spec.seed)  # LoRA A matrices are initialised from the global generator
    with _w8a8_weights_shown(model):
        return get_peft_model(model, _lora_config_for(model, config))


def _bitsandbytes_operation(exc: BaseException) -> str | None:
    """The innermost bitsandbytes function an exception passed through, or None."""
    operation, tb = None, exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if "bitsandbytes" in Path(code.co_filename).parts:
            operation = f"{Path(code.co_filename).stem}.{code.co_name}"
        tb = tb.tb_next
    return operation


def _kbit_backend_error(precision: str, operation: str, exc: Exception) -> RuntimeError:
    return RuntimeError(
        f"LoRA training at {precision} failed in bitsandbytes {operation} "
        f"({type(exc).__name__}: {exc}); {precision} fine-tuning runs on CUDA, and on CPU it needs "
        "a bitsandbytes build whose CPU backend implements that operation (0.49 or later)"
    )


# --------------------------------------------------------------------------------------------------
# Training


def _check_gradient_reached(trainable: Sequence[Any], epoch: int, precision: str) -> None:
    # A backend without a backward for some kernel can drop gradients without an error; training
    # would then burn energy for a flat loss curve.
    if not any(p.grad is not None and bool(p.grad.any()) for p in trainable):
        raise RuntimeError(
            f"no gradient reached the LoRA adapter at {precision} in the first step of epoch {epoch}: "
            "a frozen layer's kernel has no backward pass on this device"
            + (f" ({precision} fine-tuning runs on CUDA)" if precision in KBIT_PRECISIONS else "")
        )


def training_gflop(model_config: Any, examples: Sequence[TrainingExample]) -> float:
    """The useful GFLOP of one pass over ``examples``: each example's forward (its tokens causally,
    padding left out, the vocabulary projection at its answer tokens) times TRAINING_FORWARDS."""
    import numpy as np

    contexts = np.concatenate([np.arange(1, len(e.input_ids) + 1) for e in examples]) if examples else None
    tokens = sum(len(e.input_ids) for e in examples)
    logits = sum(len(e.answer_ids) for e in examples)
    return TRAINING_FORWARDS * forward_gflop(model_config, tokens, logits, contexts)


def _run_epoch(model: Any, optimizer: Any, examples: list[TrainingExample], spec: FinetuneSpec,
               pad_id: int, epoch: int, progress: bool, precision: str) -> tuple[float, int]:
    """Train one pass; returns (mean answer-token NLL, non-padding tokens fed)."""
    from tqdm.auto import tqdm

    model.train()
    total_nll, total_answer, total_tokens = 0.0, 0, 0
    batches = range(0, len(examples), spec.batch_size)
    bar = tqdm(batches, desc=f"finetune epoch {epoch}/{spec.epochs}", leave=False, disable=not progress)
    for start in bar:
        chunk = examples[start : start + spec.batch_size]
        batch = _collate(chunk, pad_id)
        nll, n_answer = _answer_nll(model, batch)
        optimizer.zero_grad(set_to_none=True)
        (nll / n_answer).backward()
        if start == 0:
            _check_gradient_reached(optimizer.param_groups[0]["params"], epoch, precision)
        optimizer.step()
        total_nll += float(nll.detach())
        total_answer += n_answer
        total_tokens += sum(len(e.input_ids) for e in chunk)
        bar.set_postfix(loss=f"{total_nll / total_answer:.3f}")
    bar.close()
    return total_nll / total_answer, total_tokens


def finetune(
    loaded: LoadedModel,
    train_items: Sequence[Any],
    eval_items: Sequence[Any],
    spec: FinetuneSpec,
    meter: EnergyMeter | None,
    out_dir: Path,
    label_set: Sequence[str] = (),
    progress: bool = True,
) -> FinetuneResult:
    """Train a LoRA adapter on ``loaded.model`` (modified in place) and save it to ``out_dir``.

    Each epoch's training runs in one energy window ``finetune:epoch{k}`` (k from 1); the eval loss
    after it is computed outside the window.
    """
    import torch

    from ..models.quant8 import count_parameters

    _check_precision(loaded.precision)
    if not train_items:
        raise ValueError(f"no training items for task {spec.task!r}: the training split is empty")
    train_examples = sampled_examples(train_items, loaded.tokenizer, spec, spec.max_train_items, label_set)
    eval_examples = sampled_examples(eval_items, loaded.tokenizer, spec, spec.max_eval_items, label_set)
    pad_id = _pad_id(loaded.tokenizer)

    model = _wrap_with_lora(loaded, spec)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate)
    order = random.Random(spec.seed)
    with _contiguous_head_input(model):
        records = _train_epochs(loaded, model, optimizer, train_examples, eval_examples, spec, pad_id, order,
                                meter, progress)
    model.eval()
    if loaded.precision == "nf4":
        set_cpu_4bit_packing(model, enabled=True)  # back to bitsandbytes' inference default
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    n_trainable, n_total = model.get_nb_trainable_parameters()
    n_total += count_parameters(model) - sum(p.numel() for p in model.parameters())  # W8A8's int8 weights
    return FinetuneResult(tuple(records), out_dir, int(n_trainable), int(n_total), model)


def _train_epochs(loaded: LoadedModel, model: Any, optimizer: Any, train_examples: list[TrainingExample],
                  eval_examples: list[TrainingExample], spec: FinetuneSpec, pad_id: int, order: random.Random,
                  meter: EnergyMeter | None, progress: bool) -> list[EpochRecord]:
    """Every epoch: its training in one energy window, then the eval loss in another (what validating
    costs is measured too, and kept apart from the epoch's training energy)."""
    records = []
    for epoch in range(1, spec.epochs + 1):
        shuffled = list(train_examples)
        order.shuffle(shuffled)
        start_s = time.perf_counter()
        window = meter.window(f"finetune:epoch{epoch}") if meter is not None else contextlib.nullcontext()
        try:
            with window as handle:
                train_loss, n_tokens = _run_epoch(model, optimizer, shuffled, spec, pad_id, epoch, progress,
                                                  loaded.precision)
        except (RuntimeError, NotImplementedError) as exc:
            operation = _bitsandbytes_operation(exc)
            if loaded.precision in KBIT_PRECISIONS and operation is not None:
                raise _kbit_backend_error(loaded.precision, operation, exc) from exc
            raise
        record = handle.record if handle is not None else None
        duration_s = record.duration_s if record is not None else time.perf_counter() - start_s
        if not math.isfinite(train_loss):
            raise RuntimeError(f"training loss became {train_loss} in epoch {epoch}; lower learning_rate "
                               f"(now {spec.learning_rate})")
        eval_record = None
        if meter is not None and eval_examples:
            with meter.window(f"finetune:eval{epoch}") as eval_handle:
                eval_loss = mean_answer_nll(model, eval_examples, pad_id, spec.batch_size)
            eval_record = eval_handle.record
        else:
            eval_loss = mean_answer_nll(model, eval_examples, pad_id, spec.batch_size)
        records.append(EpochRecord(
            epoch=epoch,
            train_loss=train_loss,
            eval_loss=eval_loss,
            duration_s=duration_s,
            energy_kwh=record.energy_kwh if record is not None else float("nan"),
            emissions_kg=record.emissions_kg if record is not None else float("nan"),
            energy_method=record.energy_method if record is not None else "none",
            n_examples=len(shuffled),
            n_tokens=n_tokens,
            gflop=training_gflop(loaded.model.config, shuffled),
            record=record,
            eval_record=eval_record,
        ))
    return records


def load_adapter(loaded: LoadedModel, adapter_dir: str | Path) -> Any:
    """Put a saved adapter on a freshly loaded base model (same name and precision); eval mode."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no {ADAPTER_FILE} (expected a folder written by "
                                "finetune)")
    if isinstance(loaded.model, PeftModel):
        raise ValueError(f"{loaded.name} at {loaded.precision} already carries an adapter; load a fresh base "
                         "model")
    from peft import LoraConfig

    config = _lora_config_for(loaded.model, LoraConfig.from_pretrained(adapter_dir))
    with _w8a8_weights_shown(loaded.model):
        model = PeftModel.from_pretrained(loaded.model, adapter_dir, config=config)
    model.eval()
    return model
