"""Task metrics by log-likelihood, with bootstrap confidence intervals over items.

Multiple-choice QA follows lm-evaluation-harness: each choice is a continuation ``" {choice}"`` of
the prompt; ``acc`` picks the highest summed log-likelihood, ``acc_norm`` the highest log-likelihood
divided by the choice's length in characters, without the leading space (lm-eval's ``len(choice)``).

Root-cause analysis scores every label of the data's label set the same way (the label read as
words, e.g. ``" fibre cut"``) and predicts the label with the highest length-normalised
log-likelihood, so that long label names are not penalised; metrics are ``accuracy`` and
``macro_f1``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..items import QAItem, RCAItem, TaskData, label_text
from ..measure.flops import forward_gflop

DEFAULT_QA_PROMPT = "Question: {question}\nAnswer:"
# qa.style options: the lettered choices in the prompt, the answer letter scored (lm-evaluation-
# harness's MMLU-style layout)
DEFAULT_QA_OPTIONS_PROMPT = "Question: {question}\n{choices}\nAnswer:"
QA_STYLES: tuple[str, ...] = ("cloze", "options")
DEFAULT_RCA_PROMPT = (
    "Network fault ticket:\n{ticket}\n"
    "Possible root causes: {labels}.\n"
    "Root cause:"
)


@dataclass(frozen=True)
class ChoiceScores:
    """Log-likelihoods of each choice of one item and the tokens the forward pass processed."""

    loglik: np.ndarray  # summed log-probability of each continuation
    continuation_chars: np.ndarray  # len(" choice") per continuation
    n_tokens: int  # tokens of this item's prompt and continuations as written (no padding)
    # tokens this item actually ran: a prefix shared by a call's requests runs once, so it counts
    # on the call's first item only (None: the same as n_tokens)
    n_tokens_run: int | None = None

    @property
    def tokens_run(self) -> int:
        return self.n_tokens if self.n_tokens_run is None else self.n_tokens_run


@dataclass(frozen=True)
class TaskResult:
    task: str
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    per_item: dict[str, np.ndarray] = field(repr=False)  # metric -> per-item values (0/1 etc.)
    item_ids: tuple[str, ...] = field(repr=False)
    predictions: tuple[int, ...] = field(repr=False)
    n_items: int = 0
    n_tokens: int = 0  # tokens as they ran through the model (a shared few-shot prefix once per call)
    n_tokens_prompted: int | None = None  # tokens of every prompt as written (None: same as n_tokens)


_PREFIXES: "weakref.WeakKeyDictionary[Any, tuple[int, ...]]" = weakref.WeakKeyDictionary()


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before any text on its own: Gemma's ``<bos>``, none for
    SmolLM2. Contexts start with them, as the model was trained (lm-evaluation-harness does the same
    for Gemma); a model whose tokenizer adds nothing is scored on the bare text."""
    try:
        return list(_PREFIXES[tokenizer])
    except (KeyError, TypeError):
        pass
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    prefix: tuple[int, ...] = ()
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            prefix = tuple(full[:start])
            break
    try:
        _PREFIXES[tokenizer] = prefix
    except TypeError:
        pass
    return list(prefix)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    # As lm-evaluation-harness: trailing spaces of the context move to the continuation, and the
    # continuation tokens are what encoding the whole string adds after the context's tokens.
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return special_prefix(tokenizer) + ctx, whole[len(ctx) :]


# Model families whose decoder takes a ready 4D attention mask as-is (transformers' masking_utils
# returns a 4D mask unchanged) and that have no layer type where doing so would be wrong.
_PACKED_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma3_text", "granite", "olmo", "olmo2"}
)
# Attention implementations and the 4D mask each wants: sdpa a boolean one (True: attend), eager an
# additive float one (0: attend, the dtype's minimum: not), which it adds to the scores.
_PACKED_ATTENTION = frozenset({"sdpa", "eager"})
# Per model: True once the packed forward matched the shared-cache one on choose_scoring_path's probe,
# False when it did not or raised; absent until choose_scoring_path has run.
_PACKED_VERIFIED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()
# Per model: True once scoring after a shared prefix's cache matched scoring whole contexts on
# choose_scoring_path's probe (both paths); False when it did not or raised.
_PREFIX_VERIFIED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()

logger = logging.getLogger(__name__)


def _packed_eligible(model: Any) -> bool:
    """Whether the one-forward packed layout may be tried on this model (before verification)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in _PACKED_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) not in _PACKED_ATTENTION:
        return False
    return not getattr(config, "is_encoder_decoder", False)


def _attention_window(model: Any) -> int | None:
    """The sliding attention window of a model that uses one, else None."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    return window if window and getattr(config, "use_sliding_window", True) else None


def _packed_supported(model: Any, length: int) -> bool | None:
    """True: use the packed forward; False: use the shared cache; None: verify on this call.

    ``length`` is the packed sequence's length: a model with sliding-window attention would ignore its
    window under a ready 4D mask, so longer sequences take the shared cache.
    """
    if not _packed_eligible(model):
        return False
    window = _attention_window(model)
    if window and length > window:
        return False
    try:
        return _PACKED_VERIFIED.get(model)
    except TypeError:  # not weak-referenceable: verify every time would be wasteful, so fall back
        return False


def _first_token(tokenizer: Any) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _encode_item(tokenizer: Any, context: str,
                 continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    pairs = [encode_pair(tokenizer, context, c) for c in continuations]
    ctx = pairs[0][0]
    conts = [cont for _, cont in pairs]
    for cont in conts:
        if not cont:
            raise ValueError(f"a continuation encodes to no tokens after context {context[-40:]!r}")
    if not ctx:  # a first token is needed to predict from
        ctx = [_first_token(tokenizer)]
    return ctx, conts


# Tokens (rows x the longest row, padding included) one packed forward call holds when several items
# are scored together (score_many): matrix products of ~2k rows keep a CPU's vector units busy, while
# the activations stay a few MB per layer. Rows are as long as the call's longest item, short items
# sharing one (pack_rows); a mask keeps each item's tokens to its own (and a shared prefix).
FORWARD_TOKENS = 2048


def score_continuations(model: Any, tokenizer: Any, context: str,
                        continuations: Sequence[str]) -> ChoiceScores:
    """Summed log-likelihood of each continuation after the context.

    The context and every continuation but its last token go through the model once, packed into
    one sequence: a 4D attention mask lets each continuation see the context and itself (causally),
    and its position ids restart after the context, so each continuation is scored as if it ran
    alone after the context (lm-evaluation-harness runs the context once per choice); the scores are
    the same, the work is not. Models where that packed forward is not known to work (by family and
    attention implementation, and checked against the shared-cache computation on first use) run
    the context once and share its key/value cache instead (two forward calls).
    """
    return score_many(model, tokenizer, [(context, continuations)])[0]


def score_many(model: Any, tokenizer: Any, requests: Sequence[tuple[str, Sequence[str]]],
               max_tokens: int = FORWARD_TOKENS) -> list[ChoiceScores]:
    """``score_continuations`` of each (context, continuations) request, in order.

    With the packed layout, requests share forward calls of up to ``max_tokens`` tokens (padding
    included), short ones sharing a row (a request's tokens see only its own); the scores are those
    of one request at a time up to rounding.
    """
    return score_encoded(model, tokenizer, encode_requests(tokenizer, requests), max_tokens)


@dataclass(frozen=True)
class EncodedRequest:
    """One (context, continuations) request as tokens, ready for forward passes."""

    context: list[int]
    continuations: list[list[int]]
    continuation_chars: tuple[int, ...]  # len(" choice") per continuation

    @property
    def n_tokens(self) -> int:
        """Tokens fed to the model: the context once, each continuation but its last token."""
        return len(self.context) + sum(len(cont) - 1 for cont in self.continuations)


def encode_requests(tokenizer: Any, requests: Sequence[tuple[str, Sequence[str]]]) -> list[EncodedRequest]:
    """Tokenise requests (no model involved: done before a measured window)."""
    out = []
    for context, continuations in requests:
        ctx, conts = _encode_item(tokenizer, context, continuations)
        out.append(EncodedRequest(ctx, conts, tuple(len(c) for c in continuations)))
    return out


def score_encoded(model: Any, tokenizer: Any, encoded: Sequence[EncodedRequest],
                  max_tokens: int = FORWARD_TOKENS) -> list[ChoiceScores]:
    """Forward passes only: the log-likelihoods of already tokenised requests, packed where the
    chosen scoring path allows (it is chosen first if nobody has, see :func:`choose_scoring_path`):
    requests fill rows as long as the longest (:func:`pack_rows`), and rows share a forward call of
    up to ``max_tokens`` tokens (:func:`forward_groups`)."""
    choose_scoring_path(model, tokenizer)  # a no-op once decided
    shared = shared_prefix_length(encoded) if _prefix_sharing_ok(model) else 0
    prefix = _PrefixCache.run(model, encoded[0].context[:shared]) if shared else None
    totals: list[list[float]] = [[] for _ in encoded]
    lengths = [r.n_tokens - shared for r in encoded]
    window = _attention_window(model)
    rows = pack_rows(lengths, window - shared if window else None)
    for group in forward_groups([sum(lengths[i] for i in row) for row in rows], max_tokens):
        batch = [[(encoded[i].context[shared:], encoded[i].continuations) for i in rows[g]] for g in group]
        order = [i for g in group for i in rows[g]]
        for i, scores in zip(order, _score_rows(model, tokenizer, batch, prefix)):
            totals[i] = scores
    return [
        ChoiceScores(loglik=np.array(t, dtype=float),
                     continuation_chars=np.array(r.continuation_chars, dtype=float), n_tokens=r.n_tokens,
                     n_tokens_run=r.n_tokens - skip)
        for t, r, skip in zip(totals, encoded, prefix_skips(len(encoded), shared))
    ]


def pack_rows(lengths: Sequence[int], limit: int | None = None) -> list[list[int]]:
    """Requests (by index) per packed row: first fit, longest first, into rows as long as the longest
    request (at most ``limit`` tokens when given: a sliding attention window less the shared prefix;
    a request longer than that has a row of its own). A row's padding costs every layer's matrix
    products as much as a token does, and its attention as much as a neighbour's masked tokens, so
    filling it with short requests is work saved. Each row's requests keep their order of indices."""
    if not lengths:
        return []
    width = max(lengths) if limit is None else min(max(lengths), max(limit, 1))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return [sorted(row) for row in rows]


def forward_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Rows (by index, of these ``lengths``: :func:`pack_rows`' rows) per forward call: longest first,
    so that the rows of a call, padded to its longest, waste little; a call takes rows while rows x its
    longest row stay within ``max_tokens`` (always one at least). Ties keep the rows' order."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def prefix_skips(n_requests: int, shared: int) -> list[int]:
    """Per request of one call, the leading tokens it does not run itself: the shared prefix runs
    once, counted on the call's first request."""
    return [shared if index else 0 for index in range(n_requests)]


Encoded = tuple[list[int], list[list[int]]]  # context tokens, each continuation's tokens


def request_contexts(request: EncodedRequest, skip: int = 0) -> np.ndarray:
    """Per token a request runs, the key positions it attends to (itself included), as
    :func:`~llm_energy.measure.flops.forward_gflop` takes them: its context from token ``skip`` on
    (the first ``skip`` ran before it, as a shared prefix's cache it still attends to), then every
    continuation but its last token, each after the whole context and its own earlier tokens."""
    n_ctx = len(request.context)
    parts = [np.arange(skip + 1, n_ctx + 1)]
    parts += [np.arange(n_ctx + 1, n_ctx + len(cont)) for cont in request.continuations]
    return np.concatenate(parts).astype(np.int64)


def scoring_gflop(model_config: Any, requests: Sequence[EncodedRequest],
                  scores: Sequence[ChoiceScores]) -> float:
    """The useful GFLOP of scoring ``requests`` as they ran (``scores``, from the same call or calls):
    each item's tokens as it ran them (a shared prefix once, on the first item of its call), and the
    vocabulary projection once per position that predicts a scored token (:func:`logit_positions`),
    whichever layout (packed or shared cache) ran them. Computed after a window, from the tokens alone."""
    return _requests_gflop(model_config, requests, [s.n_tokens - s.tokens_run for s in scores])


def call_gflop(model_config: Any, requests: Sequence[EncodedRequest], shares_prefix: bool = True) -> float:
    """The useful GFLOP one scoring call on ``requests`` will run, before it runs (``llm-energy plan``):
    their shared prefix once when the model shares prefixes (checked per model when scoring starts),
    else every request whole."""
    shared = shared_prefix_length(requests) if shares_prefix else 0
    return _requests_gflop(model_config, requests, prefix_skips(len(requests), shared))


def logit_positions(request: EncodedRequest) -> int:
    """Positions of a request whose vocabulary logits the scorer computes: the context's last (it
    predicts every continuation's first token), then each continuation's own tokens but its last."""
    return 1 + sum(len(cont) - 1 for cont in request.continuations)


def _requests_gflop(model_config: Any, requests: Sequence[EncodedRequest], skips: Sequence[int]) -> float:
    contexts = [request_contexts(r, skip) for r, skip in zip(requests, skips)]
    logits = sum(logit_positions(r) for r in requests)
    tokens = sum(len(c) for c in contexts)
    return forward_gflop(model_config, tokens, logits, np.concatenate(contexts) if contexts else None)



# Leading tokens shared by every request of a call (few-shot examples) run once per call, as a
# key/value cache every row and item continues from, when there are at least this many.
MIN_SHARED_PREFIX = 16


def shared_prefix_length(encoded: Sequence[EncodedRequest]) -> int:
    """How many leading context tokens all requests share (0 below MIN_SHARED_PREFIX, or for a single
    request); each request keeps at least its last context token, which predicts its continuations."""
    if len(encoded) < 2:
        return 0
    first = encoded[0].context
    n = min(len(r.context) for r in encoded) - 1
    for request in encoded[1:]:
        ctx = request.context
        i = 0
        while i < n and ctx[i] == first[i]:
            i += 1
        n = i
        if n < MIN_SHARED_PREFIX:
            return 0
    return n


def _output_cache(out: Any) -> tuple[Any, str]:
    """A forward's key/value cache and the keyword that passes it back in: transformers renamed
    past_key_values to cache in 5.x; both spellings are accepted."""
    return (out["cache"], "cache") if "cache" in out else (out["past_key_values"], "past_key_values")


@dataclass
class _PrefixCache:
    """The key/value cache of the tokens every request of a call starts with, computed once."""

    length: int
    cache: Any
    cache_kwarg: str  # the forward's keyword for a cache ("cache" from transformers 5.x on)

    @classmethod
    def run(cls, model: Any, ids: list[int]) -> _PrefixCache:
        import torch

        device = next(model.parameters()).device
        with torch.inference_mode():  # the decoder alone: no logit of the prefix is scored
            out = model.get_decoder()(input_ids=torch.tensor([ids], device=device), use_cache=True)
        cache, kwarg = _output_cache(out)
        return cls(len(ids), cache, kwarg)

    def layer_states(self) -> list[tuple[Any, Any]]:
        """Per decoder layer, the prefix's (keys, values) as the cache holds them: [1, kv heads,
        prefix, head size] each (what :func:`_prefix_attention` attends to)."""
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def fresh(self, batch: int) -> dict[str, Any]:
        """A copy for one forward call (a forward appends to the cache it is given), ``batch`` rows."""
        import copy

        cache = copy.deepcopy(self.cache)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return {self.cache_kwarg: cache}


def _score_rows(model: Any, tokenizer: Any, rows: list[list[Encoded]],
                prefix: _PrefixCache | None = None) -> list[list[float]]:
    """Scores of a few rows of encoded items, in order: in one packed forward where the chosen path
    allows, else each item through the shared cache; after ``prefix``'s tokens when given."""
    shift = prefix.length if prefix else 0
    fits = [_packed_supported(model, shift + sum(len(ctx) + sum(len(cont) - 1 for cont in conts)
                                                 for ctx, conts in items)) is True for items in rows]
    packed: list[list[list[float]]] = []
    if any(fits):
        try:
            packed = _score_packed_rows(model, [items for items, ok in zip(rows, fits) if ok], prefix)
        except Exception as exc:  # noqa: BLE001  (a model that rejects the packed inputs)
            _mark_packed(model, False, f"the packed forward raised {type(exc).__name__}: {exc}")
            fits = [False] * len(rows)
    out: list[list[float]] = []
    done = iter(packed)
    for items, ok in zip(rows, fits):
        # a row longer than a sliding attention window takes the shared cache (see _packed_supported)
        out += next(done) if ok else [_score_with_shared_cache(model, tokenizer, ctx, conts, prefix)
                                      for ctx, conts in items]
    return out


@dataclass(frozen=True)
class ScoringPath:
    """How a model's multiple-choice items are scored: "packed" (one forward per group of items,
    checked against the shared cache on a probe) or "shared_cache" (the context once, its key/value
    cache shared by the continuations). The scores agree up to rounding; the work differs."""

    name: str  # "packed" | "shared_cache"
    reason: str


# A probe where the packed mask matters: several continuations of more than one token, which must
# not see each other.
_PROBE = ("Network fault ticket: the link to site A went down at night.\nRoot cause:",
          (" a fibre cut on the backbone", " a power outage at the site", " a misconfigured routing table"))


def choose_scoring_path(model: Any, tokenizer: Any) -> ScoringPath:
    """Decide once per model, before anything is measured, which path scoring takes.

    A model family and attention implementation known to accept a ready 4D mask is scored packed on
    a probe and through the shared cache; the packed path is kept only when the two agree. Every
    later :func:`score_many` call on this model takes the chosen path, so no check ever runs inside
    a measured window once this has been called (``score_many`` calls it first when nobody has).
    """
    if not _packed_eligible(model):
        config = getattr(model, "config", None)
        why = (f"model type {getattr(config, 'model_type', None)!r} with attention "
               f"{getattr(config, '_attn_implementation', None)!r} is not known to take a packed 4D mask")
        return ScoringPath("shared_cache", why)
    from ..models.quant8 import exact_activations

    with exact_activations(model):  # W8A8: see quant8.exact_activations
        return _choose_scoring_path(model, tokenizer)


def _choose_scoring_path(model: Any, tokenizer: Any) -> ScoringPath:
    state = _packed_supported(model, 0)  # the decision already taken, if any (None: not yet)
    # The probe's two items, each scored plainly once (through the shared cache): the whole context,
    # and the same without two tokens after the split point (a row of another length, which both checks
    # use). Every probe forward reads every weight (0.1-0.2 s for Gemma 3 at fp32): 11 forwards in all.
    references: list[list[float]] | None = None
    if state is None:  # (once decided, nothing here runs: this is called first in every scoring call)
        ctx, conts = _encode_item(tokenizer, _PROBE[0], _PROBE[1])
        split = _probe_split(ctx)
        short = (ctx[:split] + ctx[split + 2 :], conts[:2])
        try:
            references = [_score_with_shared_cache(model, tokenizer, ctx, conts),
                          _score_with_shared_cache(model, tokenizer, *short)]
            # two rows of different lengths in one forward, the first holding both items: padding, the
            # items' mask within a row and the gathered logits are checked too
            batched = _score_packed_rows(model, [[(ctx, conts), short], [short]])
        except Exception as exc:  # noqa: BLE001
            _mark_packed(model, False, f"the packed forward raised {type(exc).__name__}: {exc}")
        else:
            a = np.array(batched[0][0] + batched[0][1] + batched[1][0])
            b = np.array(references[0] + references[1] + references[1])
            diff = float(np.max(np.abs(a - b)))
            tol = _verify_tolerance(model) * max(1.0, float(np.max(np.abs(b))))
            _mark_packed(model, diff <= tol, f"packed and shared-cache scores differ by {diff:.2e} > "
                                             f"{tol:.2e}")
        state = _packed_supported(model, 0)
    if _prefix_state(model) is None:
        _verify_prefix_sharing(model, tokenizer, bool(state), references)
    if state:
        return ScoringPath("packed", "one forward per group of items, verified against the shared cache")
    return ScoringPath("shared_cache", "the packed forward failed its check on this model (see the log)")


def scoring_decisions(model: Any) -> dict[str, bool | None]:
    """What :func:`choose_scoring_path` decided on this model: packed forward allowed, shared few-shot
    prefix allowed (None: not decided yet). A later job of the study on the same model files,
    precision and device takes them over with :func:`adopt_scoring_decisions` (phases/reuse.py)."""
    return {"packed": _packed_supported(model, 0), "prefix": _prefix_state(model)}


def adopt_scoring_decisions(model: Any, decisions: dict[str, bool | None]) -> None:
    """Take over the decisions :func:`choose_scoring_path` reached on an identical model, so no
    layout probe runs on this one (a missing decision is left to be verified on first use)."""
    for table, name in ((_PACKED_VERIFIED, "packed"), (_PREFIX_VERIFIED, "prefix")):
        value = decisions.get(name)
        if value is None:
            continue
        try:
            table[model] = bool(value)
        except TypeError:  # not weak-referenceable: left undecided
            pass


def _prefix_state(model: Any) -> bool | None:
    try:
        return _PREFIX_VERIFIED.get(model)
    except TypeError:  # not weak-referenceable: never share a prefix
        return False


def _prefix_sharing_ok(model: Any) -> bool:
    """Whether requests' shared leading tokens (few-shot examples) may run once, as a cache."""
    return _prefix_state(model) is True


def _probe_split(ctx: list[int]) -> int:
    """Where the probe's context splits into a shared prefix and the rows that continue it."""
    return max(1, len(ctx) - 8)


def _verify_prefix_sharing(model: Any, tokenizer: Any, packed: bool,
                           references: list[list[float]] | None = None) -> None:
    """Score the probe's items after a cache of their shared first tokens, through the shared-cache
    path and (when chosen) the packed one, against each whole context scored alone; share prefixes
    on this model only when all agree. ``references``: the two items' whole contexts already scored
    alone by :func:`_choose_scoring_path` (else scored here)."""
    ctx, conts = _encode_item(tokenizer, _PROBE[0], _PROBE[1])
    split = _probe_split(ctx)
    rests = [ctx[split:], ctx[split + 2 :]]  # two rows of different lengths after one prefix
    items = [(rest, conts if k == 0 else conts[:2]) for k, rest in enumerate(rests)]
    ok, why = True, ""
    try:
        reference = references or [_score_with_shared_cache(model, tokenizer, ctx[:split] + rest, c)
                                   for rest, c in items]
        prefix = _PrefixCache.run(model, ctx[:split])
        candidates = [[_score_with_shared_cache(model, tokenizer, rest, c, prefix) for rest, c in items]]
        if packed:  # a row holding both items, and a row of the second alone
            both, alone = _score_packed_rows(model, [items, items[1:]], prefix)
            candidates += [both, [both[0], alone[0]]]
        b = np.array([v for scores in reference for v in scores])
        tol = _verify_tolerance(model) * max(1.0, float(np.max(np.abs(b))))
        for got in candidates:
            diff = float(np.max(np.abs(np.array([v for scores in got for v in scores]) - b)))
            if diff > tol:
                ok, why = False, (f"scores after a shared prefix differ from whole contexts by {diff:.2e} > "
                                  f"{tol:.2e}")
    except Exception as exc:  # noqa: BLE001  (a model whose cache cannot be copied or continued)
        ok, why = False, f"scoring after a shared prefix raised {type(exc).__name__}: {exc}"
    if not ok:
        logger.warning("scoring: shared prefixes (few-shot examples) run with every item on this model: %s",
                       why)
    try:
        _PREFIX_VERIFIED[model] = ok
    except TypeError:
        pass


def _mark_packed(model: Any, ok: bool, why: str) -> None:
    if not ok:
        logger.warning("scoring: one-forward packed scoring is off for this model (%s); "
                       "using the shared key/value cache", why)
    try:
        _PACKED_VERIFIED[model] = ok
    except TypeError:
        pass


def _verify_tolerance(model: Any) -> float:
    """Relative tolerance of packed against shared-cache scores: the layout changes only rounding,
    while a mask or positions the model ignored would change scores by far more. Half precision gets
    the wider one, and so do bitsandbytes layers: on a CPU their 4-bit kernels differ between call
    shapes by ~1e-3 of the score (measured on SmolLM2 at nf4; 1e-6 at fp32)."""
    import torch

    if any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules()):
        return 5e-2
    return 1e-3 if _compute_dtype(model) in (torch.float32, torch.float64) else 5e-2


def _compute_dtype(model: Any) -> Any:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.is_floating_point():
        return weight.dtype
    return getattr(model, "dtype", None)


def _packed_row(items: list[Encoded]) -> dict[str, Any]:
    """One row of the packed layout: each item's context, then each of its continuations but the last
    token; a token sees its own context and its own continuation's earlier tokens."""
    import torch

    ids: list[int] = []
    positions: list[int] = []
    segment: list[int] = []  # per token: which continuation, counted over the row; -1: a context token
    owner: list[int] = []  # per token: which item
    predict_from: list[int] = []  # per continuation token: the row position whose logits predict it
    targets: list[int] = []
    n_seg = 0
    for k, (ctx, conts) in enumerate(items):
        last_ctx = len(ids) + len(ctx) - 1
        ids += ctx
        positions += range(len(ctx))
        segment += [-1] * len(ctx)
        owner += [k] * len(ctx)
        for cont in conts:
            start = len(ids)
            ids += cont[:-1]
            positions += range(len(ctx), len(ctx) + len(cont) - 1)
            segment += [n_seg] * (len(cont) - 1)
            owner += [k] * (len(cont) - 1)
            predict_from += [last_ctx, *range(start, start + len(cont) - 1)]
            targets += cont
            n_seg += 1
    seg, own = torch.tensor(segment), torch.tensor(owner)
    visible = (seg[:, None] == seg[None, :]) | (seg[None, :] == -1)
    mask = torch.ones(len(ids), len(ids), dtype=torch.bool).tril_() & visible & (own[:, None] == own[None, :])
    return {"ids": ids, "positions": positions, "mask": mask, "predict_from": predict_from,
            "targets": targets}


# The packed forward on a CPU: each row's queries attend to a shared prefix's keys and values, held
# once (not copied into every row's cache), and to their own row's, in one softmax per query over both
# (:func:`_prefix_attention`; without a prefix, to their own row's alone).
PREFIX_ATTENTION = "llm_energy_prefix"  # the attention implementation's name while a packed forward runs
PREFIX_KWARG = "llm_energy_prefix_states"  # the forward's keyword carrying the prefix's per-layer states
# Most bytes of attention scores one step of _prefix_attention holds (counted at 4 bytes a score):
# steps cover whole rows, or a row's queries in slices when a row alone would need more. Small enough
# that a step's scores stay in cache from their product through the mask, the softmax and the product
# with the values: SmolLM2's QA calls (5-shot, 200 items in 4 calls) on the 2-core AVX-512 AMD kind spent
# 7.1-7.8 s in attention at 128 MiB a step (every row of a call at once, ~33 MB of scores a layer) and
# 5.3-5.4 s at 4-8 MiB (fp32; w8a8, whose attention is fp32 too, 7.3 -> 5.5 s; bf16 4.8 -> 3.3-3.8 s);
# 1-2 MiB were slower again (more, smaller products); the scores are the same bit for bit.
PREFIX_SCORES_BYTES = 4 * 2**20


def _split_prefix_attention(model: Any, device: Any) -> bool:
    """Whether packed rows attend through :func:`_prefix_attention` (to a prefix held once, if any):
    on a CPU, for a model without attention-logit soft-capping. Elsewhere the model's own attention
    runs, after a prefix's cache copied into every row."""
    return device.type == "cpu" and not getattr(model.config, "attn_logit_softcapping", None)


def _prefix_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                      dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """Attention of packed rows that continue a shared prefix (a transformers attention function).

    ``query``, ``key``, ``value``: this forward's rows, [rows, heads, width, head size] (key and value
    with the model's key/value heads); ``attention_mask``: additive, [rows, 1, width, width], within
    rows only. The prefix's keys and values for this layer come in the forward's PREFIX_KWARG, once
    for all rows (None: no prefix, each row attends to its own keys alone, as masked).
    Per row, the prefix's keys and the row's own are put side by side and every query
    takes one softmax over both (the row's part masked): two batched matrix products per key/value
    head, the query heads that share it stacked, so each product is large, taken a few rows at a time
    (PREFIX_SCORES_BYTES) so that the scores stay in cache between the steps. On the 2-core AVX-512 AMD
    kind one SmolLM2 layer (13 rows x 154 queries, 304 prefix keys) took 13.5 ms at bf16 and 21.4 ms at
    fp32 against 20.5 and 29.7 ms for torch's flash kernel called for the prefix and the row apart
    (benchmarks/results/2026-12-06-cpu-precision_limits.md); the scorer's path
    check compares it with the shared-cache computation on every model. In a 16-bit dtype the scores
    are taken less each query's score against the first key (:func:`_centred_queries`), so that the
    product's rounding does not cost the softmax its digits."""
    import torch

    if kwargs.get("softcap") is not None:
        raise ValueError("the split prefix attention has no attention-logit soft-capping")
    states = kwargs[PREFIX_KWARG]
    prefix_key, prefix_value = states[module.layer_idx] if states is not None else (None, None)
    rows, heads, width, size = query.shape
    kv = key.shape[1]
    groups = heads // kv
    n_prefix = prefix_key.shape[2] if prefix_key is not None else 0
    scale = size**-0.5 if scaling is None else scaling
    out = torch.empty((rows, width, heads, size), dtype=query.dtype, device=query.device)
    per_query = heads * (n_prefix + width) * 4  # bytes of scores per query position
    step = max(1, PREFIX_SCORES_BYTES // (per_query * width))  # whole rows per step
    span = width if step > 1 else max(1, min(width, PREFIX_SCORES_BYTES // per_query))  # queries per step
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = r1 - r0
        keys, values = key[r0:r1], value[r0:r1]
        if n_prefix:
            keys = torch.cat([prefix_key.expand(n, kv, n_prefix, size), keys], dim=2)
            values = torch.cat([prefix_value.expand(n, kv, n_prefix, size), values], dim=2)
        centred = query.dtype not in (torch.float32, torch.float64)
        if centred:  # a last component of 1 on every key: see _centred_queries
            keys = torch.cat([keys, keys.new_ones((n, kv, n_prefix + width, 1))], dim=-1)
        for q0 in range(0, width, span):
            q1 = min(width, q0 + span)
            # [n, kv, groups x queries, size]: the query heads of one key/value head stacked
            q = (query[r0:r1, :, q0:q1] * scale).reshape(n, kv, groups * (q1 - q0), size)
            if centred:
                q = _centred_queries(q, keys)
            scores = torch.matmul(q, keys.transpose(-1, -2))
            own = scores.view(n, kv, groups, q1 - q0, n_prefix + width)[..., n_prefix:]
            own.add_(attention_mask[r0:r1, :, None, q0:q1])
            probs = torch.softmax(scores, dim=-1)
            o = torch.matmul(probs, values).view(n, heads, q1 - q0, size)
            out[r0:r1, q0:q1] = o.transpose(1, 2)
    return out, None


def _centred_queries(q: Any, keys: Any) -> Any:
    """Queries [..., queries, size] in a 16-bit dtype, given one more component: minus each query's
    score against the first key, taken in fp32 (``keys`` [..., keys, size + 1] end in a component of 1).

    A 16-bit matrix product accumulates in fp32 but rounds its output: a score of 20 would come back
    within 0.06, and its exponential within 6%. With the extra component each query's scores come back
    less that one score, subtracted inside the fp32 accumulation, so the scores that carry the
    softmax's weight (near the first key's: an item's first token, the usual attention sink) are small
    and keep their digits. The softmax does not change under a per-query constant, and that constant's
    own rounding is one per query. Measured (Gemma 3 at bf16, 120 RCA items): mean distance of the
    log-likelihoods to fp32's 0.043, against 0.054 with plain 16-bit scores and 0.042 with torch's flash
    kernel, which keeps its scores in fp32."""
    import torch

    first = torch.matmul(q.float(), keys[..., :1, :-1].float().transpose(-1, -2))  # [..., queries, 1]
    return torch.cat([q, first.neg_().to(q.dtype)], dim=-1)


@contextlib.contextmanager
def _attention(model: Any, name: str | None) -> Iterator[None]:
    """Within the block, the model's attention is the named implementation (None: unchanged)."""
    if name is None:
        yield
        return
    from transformers import AttentionInterface

    AttentionInterface.register(name, _prefix_attention)  # idempotent: the same function under its name
    decoder_config = getattr(model.get_decoder(), "config", None)
    configs = {id(c): c for c in (model.config, decoder_config) if c is not None}
    before = {key: c._attn_implementation for key, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation = before[key]


def _final_logits(model: Any, hidden: Any) -> Any:
    """The vocabulary projection of final hidden states, with the output scalings the families in
    _PACKED_MODEL_TYPES apply (Gemma's final soft-capping, Granite's logits scaling)."""
    import torch

    logits = model.get_output_embeddings()(hidden)
    config = model.config
    scaling = getattr(config, "logits_scaling", None)
    if scaling:
        logits = logits / scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _score_packed_rows(model: Any, rows: list[list[Encoded]],
                       prefix: _PrefixCache | None = None) -> list[list[list[float]]]:
    """One forward for several packed rows (right-padded to the longest; a pad token sees only
    itself). Logits are computed only where a continuation token is predicted: the final hidden
    states at those positions, gathered over the rows, go through the vocabulary projection. With a
    ``prefix``, every row continues from its cache: every token also sees the prefix's tokens, and
    positions start after them."""
    import torch

    device = next(model.parameters()).device
    built = [_packed_row(items) for items in rows]
    width = max(len(b["ids"]) for b in built)
    n = len(built)
    shift = prefix.length if prefix else 0
    split = _split_prefix_attention(model, device)
    keys = 0 if split else shift  # the mask's prefix columns: none when the prefix is attended apart
    ids = torch.zeros((n, width), dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width, keys + width), dtype=torch.bool)
    mask[:, :, :keys] = True
    mask[:, :, keys:] = torch.eye(width, dtype=torch.bool)
    for r, b in enumerate(built):
        length = len(b["ids"])
        ids[r, :length] = torch.tensor(b["ids"])
        positions[r, :length] = torch.tensor(b["positions"]) + shift
        mask[r, :length, keys : keys + length] = b["mask"]
    if split:
        extra: dict[str, Any] = {"use_cache": False, PREFIX_KWARG: prefix.layer_states() if prefix else None}
    elif prefix is None:
        extra = {"use_cache": False}
    else:
        extra = prefix.fresh(n)
    # additive for eager attention and the split prefix attention: 0 where attended, the minimum elsewhere
    if split or model.config._attn_implementation == "eager":
        dtype = _compute_dtype(model)
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
    # logits once per position that predicts something: the options style's letters (and the first
    # token of every continuation) are all predicted from the context's last position
    flat = torch.tensor([r * width + p for r, b in enumerate(built) for p in b["predict_from"]])
    where, which = torch.unique(flat, return_inverse=True)
    targets = torch.tensor([t for b in built for t in b["targets"]])
    with torch.inference_mode(), _attention(model, PREFIX_ATTENTION if split else None):
        hidden = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask[:, None].to(device),
                                     position_ids=positions.to(device), **extra).last_hidden_state
        picked_hidden = hidden.reshape(n * width, -1)[where.to(device)]
        logprobs = torch.log_softmax(_final_logits(model, picked_hidden).float(), dim=-1)
        picked = logprobs[which.to(logprobs.device), targets.to(logprobs.device)].cpu().tolist()
    out, i = [], 0
    for items in rows:
        row_scores = []
        for _, conts in items:
            scores = []
            for cont in conts:
                scores.append(float(sum(picked[i : i + len(cont)])))
                i += len(cont)
            row_scores.append(scores)
        out.append(row_scores)
    return out


def _score_with_shared_cache(model: Any, tokenizer: Any, ctx: list[int], conts: list[list[int]],
                            prefix: _PrefixCache | None = None) -> list[float]:
    """Two forwards: the context once with its key/value cache, then every continuation but its
    last token against that cache repeated per continuation (padded on the right). With a
    ``prefix``, ``ctx`` continues a copy of the prefix's cache."""
    import torch

    device = next(model.parameters()).device
    shift = prefix.length if prefix else 0
    with torch.inference_mode():
        # only the last context position's logits are needed (a 262k vocabulary makes the rest costly)
        out = model(input_ids=torch.tensor([ctx], device=device), use_cache=True, logits_to_keep=1,
                    **(prefix.fresh(1) if prefix else {}))
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu()
        totals = [float(first[cont[0]]) for cont in conts]
        longer = [i for i, cont in enumerate(conts) if len(cont) > 1]
        if longer:
            inputs = [conts[i][:-1] for i in longer]
            width = max(len(x) for x in inputs)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ids = torch.full((len(inputs), width), pad, dtype=torch.long)
            seen = shift + len(ctx)  # tokens in the cache
            mask = torch.zeros((len(inputs), seen + width), dtype=torch.long)
            mask[:, :seen] = 1
            for row, x in enumerate(inputs):
                ids[row, : len(x)] = torch.tensor(x)
                mask[row, seen : seen + len(x)] = 1
            cache, kwarg = _output_cache(out)
            cache.batch_repeat_interleave(len(inputs))
            positions = torch.arange(seen, seen + width).expand(len(inputs), -1)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), use_cache=True, **{kwarg: cache}).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, i in enumerate(longer):
                targets = torch.tensor(conts[i][1:])
                totals[i] += float(logprobs[row, torch.arange(len(targets)), targets].sum())
    return totals


def score_continuations_unshared(model: Any, tokenizer: Any, context: str,
                                 continuations: Sequence[str]) -> ChoiceScores:
    """The reference computation: context and continuation run together, once per continuation."""
    import torch

    pairs = [encode_pair(tokenizer, context, c) for c in continuations]
    sequences = []
    for ctx, cont in pairs:
        if not ctx:
            ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        sequences.append((ctx, cont))
    inputs = [ctx + cont[:-1] for ctx, cont in sequences]
    width = max(len(x) for x in inputs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    ids = torch.full((len(inputs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    for row, x in enumerate(inputs):
        ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1).cpu()
    totals = []
    for row, (ctx, cont) in enumerate(sequences):
        positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
        totals.append(float(logprobs[row, positions, torch.tensor(cont)].sum()))
    return ChoiceScores(
        loglik=np.array(totals),
        continuation_chars=np.array([len(c) for c in continuations], dtype=float),
        n_tokens=int(mask.sum()),
    )


def bootstrap_interval(values: np.ndarray, statistic: Callable[[np.ndarray], float] = np.mean,
                       n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic over items."""
    values = np.asarray(values)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(n_boot, len(values)))
    stats = (np.array([statistic(values[d]) for d in draws]) if statistic is not np.mean
             else values[draws].mean(axis=1))
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def macro_f1(gold: Sequence[int], predicted: Sequence[int], n_labels: int) -> float:
    """Unweighted mean of per-label F1 over the labels present in gold or predictions."""
    gold, predicted = np.asarray(gold), np.asarray(predicted)
    scores = []
    for label in range(n_labels):
        tp = np.sum((predicted == label) & (gold == label))
        fp = np.sum((predicted == label) & (gold != label))
        fn = np.sum((predicted != label) & (gold == label))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def _bootstrap_macro_f1(gold: np.ndarray, predicted: np.ndarray, n_labels: int, n_boot: int,
                        seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(gold), size=(n_boot, len(gold)))
    stats = np.array([macro_f1(gold[d], predicted[d], n_labels) for d in draws])
    return float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))


@dataclass(frozen=True)
class PreparedTask:
    """A task's items tokenised for scoring: everything a measured window needs but the model."""

    task: str
    data: TaskData
    encoded: tuple[EncodedRequest, ...]
    labels: tuple[str, ...] = ()  # rca: the label order of each request's continuations
    style: str = "cloze"  # qa: cloze (each choice's text scored) | options (the answer letter scored)


def prepare_task(task: str, tokenizer: Any, data: TaskData, prompt: str | None = None,
                 style: str = "cloze") -> PreparedTask:
    """Build and tokenise every request of a task (before any measured window).

    QA ``style``: ``cloze`` scores each choice's text as a continuation of the question; ``options``
    shows the lettered choices (``A. ...``) in the prompt and scores each letter (`` A``, `` B``, ...),
    so that a choice such as "Both option 1 and 2" can be read against the others."""
    requests = request_texts(task, data, prompt, style)
    if task == "qa":
        return PreparedTask("qa", data, tuple(encode_requests(tokenizer, requests)), style=style)
    return PreparedTask("rca", data, tuple(encode_requests(tokenizer, requests)), tuple(data.labels))


def request_texts(task: str, data: TaskData, prompt: str | None = None,
                  style: str = "cloze") -> list[tuple[str, list[str]]]:
    """Each item's (context, continuations) as text: what :func:`prepare_task` tokenises."""
    if task == "qa":
        if style not in QA_STYLES:
            raise ValueError(f"qa style must be one of {list(QA_STYLES)}; got {style!r}")
        prompt = prompt or (DEFAULT_QA_OPTIONS_PROMPT if style == "options" else DEFAULT_QA_PROMPT)
        if style == "options" and "{choices}" not in prompt:
            raise ValueError("qa style 'options' needs a prompt with a {choices} field (where the lettered "
                             "choices go)")
        prefix = fewshot_prefix(data.fewshot, prompt, style)
        requests = []
        for item in data.items:
            assert isinstance(item, QAItem)
            context = prefix + prompt.format(question=item.question, choices=choice_block(item.choices))
            if style == "options":
                requests.append((context, [" " + choice_letter(i) for i in range(len(item.choices))]))
            else:
                requests.append((context, [" " + c for c in item.choices]))
        return requests
    if task == "rca":
        prompt = prompt or DEFAULT_RCA_PROMPT
        continuations = [" " + label_text(label) for label in data.labels]
        label_list = ", ".join(label_text(label) for label in data.labels)
        requests = []
        for item in data.items:
            assert isinstance(item, RCAItem)
            requests.append((prompt.format(ticket=item.ticket, labels=label_list), list(continuations)))
        return requests
    raise ValueError(f"unknown task {task!r}")


FEWSHOT_SEPARATOR = "\n\n"  # between worked examples, and before the scored question (lm-eval's default)


def fewshot_prefix(examples: Sequence[Any], prompt: str, style: str) -> str:
    """The worked examples every QA item is shown first: each the prompt filled with an example's
    question (and lettered choices) followed by " " and its answer -- the letter under ``options``, the
    choice's text under ``cloze`` -- then a blank line. Empty without examples."""
    parts = []
    for example in examples:
        assert isinstance(example, QAItem)
        answer = choice_letter(example.answer) if style == "options" else example.choices[example.answer]
        parts.append(prompt.format(question=example.question, choices=choice_block(example.choices))
                     + " " + answer + FEWSHOT_SEPARATOR)
    return "".join(parts)


def score_prepared(model: Any, tokenizer: Any, prepared: PreparedTask, progress: bool = False,
                   chunk: int = 32) -> list[ChoiceScores]:
    """The forward passes of a prepared task, and nothing else: what a measured window holds."""
    if not progress:
        return score_encoded(model, tokenizer, prepared.encoded)
    from tqdm.auto import tqdm

    scores: list[ChoiceScores] = []
    with tqdm(total=len(prepared.encoded), desc=f"scoring {prepared.task}", leave=False) as bar:
        for start in range(0, len(prepared.encoded), chunk):
            part = prepared.encoded[start : start + chunk]
            scores += score_encoded(model, tokenizer, part)
            bar.update(len(part))
    return scores


def task_result(prepared: PreparedTask, scores: Sequence[ChoiceScores], n_boot: int = 1000,
                seed: int = 0) -> TaskResult:
    """Metrics and bootstrap intervals from the scores (after the measured window): each task's per-item
    0/1 metrics (averaged, with a bootstrap interval each), plus RCA's macro-F1 (a corpus statistic)."""
    data = prepared.data
    extra_metrics: dict[str, float] = {}
    extra_intervals: dict[str, tuple[float, float]] = {}
    if prepared.task == "qa" and prepared.style == "options":
        # one letter per choice: acc is the metric (a length normalisation would change nothing)
        predictions = [int(np.argmax(s.loglik)) for s in scores]
        per_item = {"acc": np.array([float(p == item.answer) for p, item in zip(predictions, data.items)])}
    elif prepared.task == "qa":
        correct, correct_norm, predictions = [], [], []
        for item, s in zip(data.items, scores):
            best = int(np.argmax(s.loglik))
            # lm-evaluation-harness normalises by len(choice), without the leading space it scores.
            best_norm = int(np.argmax(s.loglik / np.array([len(c) for c in item.choices], dtype=float)))
            correct.append(float(best == item.answer))
            correct_norm.append(float(best_norm == item.answer))
            predictions.append(best)
        per_item = {"acc": np.array(correct), "acc_norm": np.array(correct_norm)}
    else:
        labels = list(prepared.labels)
        predictions = [int(np.argmax(s.loglik / s.continuation_chars)) for s in scores]
        gold_a, pred_a = (np.array([labels.index(item.root_cause) for item in data.items]),
                          np.array(predictions))
        per_item = {"accuracy": (gold_a == pred_a).astype(float)}
        extra_metrics["macro_f1"] = macro_f1(gold_a, pred_a, len(labels))
        extra_intervals["macro_f1"] = _bootstrap_macro_f1(gold_a, pred_a, len(labels), min(n_boot, 500), seed)
    return TaskResult(
        task=prepared.task,
        metrics={**{k: float(v.mean()) for k, v in per_item.items()}, **extra_metrics},
        intervals={**{k: bootstrap_interval(v, n_boot=n_boot, seed=seed) for k, v in per_item.items()},
                   **extra_intervals},
        per_item=per_item,
        item_ids=tuple(i.id for i in data.items),
        predictions=tuple(predictions),
        n_items=len(data.items),
        n_tokens=sum(s.tokens_run for s in scores),
        n_tokens_prompted=sum(s.n_tokens for s in scores),
    )


def evaluate_qa(model: Any, tokenizer: Any, data: TaskData, prompt: str | None = None,
                progress: bool = False, n_boot: int = 1000, seed: int = 0,
                style: str = "cloze") -> TaskResult:
    prepared = prepare_task("qa", tokenizer, data, prompt, style)
    return task_result(prepared, score_prepared(model, tokenizer, prepared, progress), n_boot, seed)


def evaluate_rca(model: Any, tokenizer: Any, data: TaskData, prompt: str | None = None,
                 progress: bool = False, n_boot: int = 1000, seed: int = 0) -> TaskResult:
    prepared = prepare_task("rca", tokenizer, data, prompt)
    return task_result(prepared, score_prepared(model, tokenizer, prepared, progress), n_boot, seed)


def score_task(task: str, model: Any, tokenizer: Any, data: TaskData, prompt: str | None = None,
               progress: bool = False, seed: int = 0, style: str = "cloze") -> TaskResult:
    """Score one task, unmeasured; the same function for every precision and model (prepare,
    score, metrics)."""
    prepared = prepare_task(task, tokenizer, data, prompt, style)
    return task_result(prepared, score_prepared(model, tokenizer, prepared, progress), seed=seed)


def evaluate(task: str, model: Any, tokenizer: Any, data: TaskData, prompt: str | None = None,
             progress: bool = False, seed: int = 0, style: str = "cloze") -> TaskResult:
    """Deprecated alias of :func:`score_task`."""
    warnings.warn("llm_energy.methods.scoring.evaluate is deprecated: use score_task",
                  DeprecationWarning, stacklevel=2)
    return score_task(task, model, tokenizer, data, prompt, progress, seed, style)


def choice_letter(index: int) -> str:
    if not 0 <= index < 26:
        raise ValueError(f"choice {index} has no letter (at most 26 choices)")
    return chr(ord("A") + index)


def choice_block(choices: Sequence[str]) -> str:
    return "\n".join(f"{choice_letter(i)}. {c}" for i, c in enumerate(choices))
