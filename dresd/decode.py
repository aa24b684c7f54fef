"""The decode loop: draft, merge into a tree, verify in one forward, accept, prune. Lossless.

State between steps: the KV cache holds the prompt and every committed token except ``y``, the
token the model decided last. Each step asks the drafter for continuations of ``y``, verifies the
tree rooted at ``y``, and commits ``y`` plus the accepted draft tokens; the token the model
chooses after the accepted path becomes the next ``y``. So each verify forward emits the accepted
draft tokens plus one token of the model's own.

Metrics (per generation):

- ``steps``: verify forwards (the prefill forward, which decides the first token, is not a step).
- AL (accepted length): tokens emitted by verify steps / steps, i.e. mean of accepted + 1.
- AR (acceptance rate): accepted draft tokens / draft tokens proposed on the verified path, where
  the verified path of a step is the longest draft through the accepted nodes (accepted depth +
  the longest branch below the last accepted node). A step with no drafts proposes 0 tokens.
- TPS: new tokens / total wall time (prefill included).
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dresd.config import option
from dresd.drafters.base import Drafter, DraftRequest
from dresd.sampling import SamplingParams, accept_among_children, sample, target_probs
from dresd.tree import DraftTree, TreeBudget, model_forward, prune_cache, verify_tree

DRAFTER_NAMES = ("dense", "context", "prompt_lookup", "rest")
BUDGET_POLICIES = ("calibrated", "fixed")


def drafter_names(spec: str, has_store: bool) -> list[str]:
    """The sources named by ``DecodeConfig.drafter``: 'hybrid' or a comma-separated list."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["hybrid"]:
        return ["dense", "context", "prompt_lookup"] if has_store else ["context", "prompt_lookup"]
    bad = [n for n in names if n not in DRAFTER_NAMES]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"drafter must be 'hybrid' or distinct names among {DRAFTER_NAMES}, "
                         f"not {spec!r}")
    return names


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = option(128, "tokens to generate at most")
    num_drafts: int = option(10, "drafts merged into the tree per step")
    draft_len: int = option(10, "tokens kept of each draft")
    max_tree_tokens: int = option(64, "tree nodes verified per forward, root included")
    k: int = option(10, "neighbours retrieved from the store per step (each is one draft)")
    nprobe: int = option(0, "IVF lists probed per search (0: the store's default)")
    temperature: float = option(0.0, "0 decodes greedily; > 0 samples")
    top_k: int = option(0, "sample among the k likeliest tokens (0: off)")
    top_p: float = option(1.0, "nucleus sampling mass (1: off)")
    seed: int = option(0, "random seed for sampling")
    stop_strings: tuple[str, ...] = option((), "stop when the text contains one of these")
    drafter: str = option(
        "hybrid", "draft sources when decoding from a store (or from none): 'hybrid' (dense "
        "store + context + prompt_lookup in one tree; without a store, context + "
        "prompt_lookup) or a comma-separated list of " + ", ".join(DRAFTER_NAMES))
    budget: str = option(
        "calibrated", "tree size per step: 'calibrated' (maximise expected tokens per second "
        "under this device's measured verify cost, saved by `dresd calibrate`) or 'fixed' "
        "(fill max_tree_tokens)", choices=BUDGET_POLICIES)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.nprobe < 0:
            raise ValueError(f"nprobe must be >= 0 (0: the store's default), got {self.nprobe}")
        if self.budget not in BUDGET_POLICIES:
            raise ValueError(f"budget must be one of {BUDGET_POLICIES}, not {self.budget!r}")
        drafter_names(self.drafter, has_store=True)  # validates the names
        # Building them validates temperature, top-k, top-p and the tree budget.
        _ = (self.sampling, self.tree_budget)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)

    @property
    def tree_budget(self) -> TreeBudget:
        return TreeBudget(self.num_drafts, self.draft_len, self.max_tree_tokens)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    step_tokens: int = 0  # tokens emitted by verify steps
    accepted_tokens: int = 0
    proposed_tokens: int = 0
    tree_tokens: int = 0
    total_s: float = 0.0
    prefill_s: float = 0.0
    retrieval_s: float = 0.0
    verify_s: float = 0.0
    stopped_by: str = ""

    @property
    def accepted_length(self) -> float:
        return self.step_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else 0.0

    @property
    def other_s(self) -> float:
        return max(0.0, self.total_s - self.prefill_s - self.retrieval_s - self.verify_s)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(AL=self.accepted_length, AR=self.acceptance_rate, TPS=self.tokens_per_second,
                 other_s=self.other_s)
        return d

    def summary(self) -> str:
        return (
            f"tokens {self.new_tokens} in {self.steps} steps | AL {self.accepted_length:.2f} | "
            f"AR {self.acceptance_rate:.2f} | TPS {self.tokens_per_second:.1f} | "
            f"time {self.total_s:.2f}s: prefill {self.prefill_s:.2f}s, retrieval "
            f"{self.retrieval_s:.3f}s, verify {self.verify_s:.2f}s, other {self.other_s:.2f}s | "
            f"stopped by {self.stopped_by}"
        )


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]  # new tokens, EOS included when generation stopped on it
    prompt_tokens: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)


Prompt = str | Sequence[int] | Sequence[dict]
TokenCallback = Callable[[list[int], str], None]


def context_length(model) -> int | None:
    """The longest sequence the model's positions allow (None when its config names none)."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """A string is tokenized as is; a list of {role, content} goes through the chat template;
    a list of ints is taken as token ids."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    elif len(prompt) and all(isinstance(m, dict) for m in prompt):
        ids = tokenizer.apply_chat_template(
            list(prompt), add_generation_prompt=True, tokenize=True, return_dict=False
        )
    elif all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    else:
        raise TypeError("prompt must be a string, a list of chat messages or a list of token ids")
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("the prompt is empty")
    return ids


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokens ``model.generate`` stops on: the generation config's EOS, else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


# Logits processors model.generate applies even when greedy, and their neutral values.
_PROCESSOR_SETTINGS = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": 0,
    "suppress_tokens": (),
    "begin_suppress_tokens": (),
    "bad_words_ids": (),
    "sequence_bias": (),
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
}


def check_plain_decoding(model) -> None:
    """Refuse a generation config whose logits processors change greedy decoding.

    dresd verifies drafts against the model's plain distribution; ``model.generate`` would
    apply these settings (Qwen2.5-Instruct ships ``repetition_penalty=1.05``), so the two outputs
    would differ. Rather than silently decode something else, say which settings to reset.
    """
    gc = getattr(model, "generation_config", None)
    used = []
    for name, neutral in _PROCESSOR_SETTINGS.items():
        value = getattr(gc, name, None)
        if value is None or value == neutral or (neutral == () and len(value) == 0):
            continue
        used.append(f"{name}={value!r}")
    if used:
        raise ValueError(
            f"the model's generation_config sets {', '.join(used)}: model.generate applies these "
            "even when decoding greedily and dresd does not, so the outputs would differ. Reset "
            "them first (e.g. model.generation_config.repetition_penalty = 1.0)."
        )


def as_drafter(source, config: DecodeConfig, model=None, tokenizer=None) -> Drafter:
    """A Drafter as is. A Store (checked against the model), or None, becomes the sources
    ``config.drafter`` names: one source under a fixed budget is returned alone, anything else
    is a CompositeDrafter under ``config.budget`` (the calibrated budget needs ``model``)."""
    if isinstance(source, Drafter):
        return source
    from dresd.store import Store

    if source is not None and not isinstance(source, Store):
        raise TypeError(f"expected a Drafter or a Store (or None), got {type(source).__name__}")
    store = source
    if store is not None and model is not None and tokenizer is not None:
        store.check_model(model, tokenizer)
    names = drafter_names(config.drafter, has_store=store is not None)
    sources = [_make_source(name, store, config) for name in names]
    if config.budget == "fixed" and len(sources) == 1:
        return sources[0]
    from dresd.budget import FixedBudget, calibrated_budget
    from dresd.drafters.composite import CompositeDrafter

    if config.budget == "fixed":
        policy = FixedBudget(config.max_tree_tokens)
    else:
        if model is None:
            raise ValueError("the calibrated budget needs the model (its verify cost is "
                             "measured on its device)")
        fingerprint = store.manifest.model.fingerprint if store is not None else None
        policy = calibrated_budget(model, tokenizer, fingerprint, config.max_tree_tokens)
    return CompositeDrafter(sources, policy, memory=_acceptance_memory(model, store, config))


_MEMORIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _acceptance_memory(model, store, config: DecodeConfig) -> dict | None:
    """Where a composite keeps its acceptance estimates between generate calls: one dict per
    model object, store and drafting configuration (None without the model)."""
    if model is None:
        return None
    key = (str(store.path) if store is not None else "",
           store.manifest.generation if store is not None else 0,
           config.drafter, config.budget, config.num_drafts, config.draft_len,
           config.max_tree_tokens, config.k, config.nprobe)
    return _MEMORIES.setdefault(model, {}).setdefault(key, {})


def _make_source(name: str, store, config: DecodeConfig) -> Drafter:
    if name in ("dense", "rest") and store is None:
        raise ValueError(f"the {name} drafter needs a store")
    if name == "dense":
        from dresd.drafters.dense import StoreDrafter

        return StoreDrafter(store, k=config.k, nprobe=config.nprobe)
    if name == "context":
        from dresd.drafters.context import ContextDrafter

        return ContextDrafter(store.transform if store is not None else None, k=config.k)
    if name == "prompt_lookup":
        from dresd.drafters.prompt_lookup import PromptLookupDrafter

        return PromptLookupDrafter()
    from dresd.drafters.rest import RestDrafter

    return RestDrafter.from_store(store)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TextStream:
    """Decodes the growing output once per step and hands out what is new."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""

    def update(self, tokens: list[int]) -> str:
        full = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return ""
        delta = full[len(self.text):] if full.startswith(self.text) else full
        self.text = full
        return delta


def _first_stop(text: str, stop_strings: Sequence[str]) -> int:
    hits = [text.find(s) for s in stop_strings if s and s in text]
    return min(hits) if hits else -1


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    source,
    prompt: Prompt,
    config: DecodeConfig | None = None,
    on_token: TokenCallback | None = None,
    **overrides,
) -> GenerationResult:
    """Speculative decoding of ``prompt`` with drafts from ``source``: a Drafter, used as is,
    or a Store (or None, for the store-free sources), which becomes the sources
    ``config.drafter`` names under ``config.budget`` (see ``as_drafter``). By default that is
    the hybrid composite (dense store + context + prompt lookup) with the calibrated budget.

    Greedy when ``temperature`` is 0: the tokens equal ``model.generate(do_sample=False)``.
    Otherwise each token is distributed exactly as plain sampling with the same temperature,
    top-k and top-p. ``on_token(new_tokens, new_text)`` is called after every step. Any
    DecodeConfig field may be passed as a keyword to override ``config``.
    """
    from transformers import DynamicCache

    config = dataclasses.replace(config or DecodeConfig(), **overrides)
    check_plain_decoding(model)
    drafter = as_drafter(source, config, model, tokenizer)
    params = config.sampling
    budget = config.tree_budget
    device = model.device
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(config.seed)
    stops = stop_token_ids(model, tokenizer)

    prompt_ids = encode_prompt(tokenizer, prompt)
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids outside the model's vocabulary of {vocab}: {bad[:5]}")
    context = context_length(model)
    if context and len(prompt_ids) >= context:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens, the model's context is "
                         f"{context} tokens: no room to generate (shorten the prompt)")

    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    stream = _TextStream(tokenizer)
    out: list[int] = []
    t_start = time.perf_counter()

    def choose(logits_row: torch.Tensor) -> int:
        if params.greedy:
            return int(logits_row.argmax())
        return sample(target_probs(logits_row, params), generator)

    # Prefill decides the first token.
    cache = DynamicCache()
    prefill = model_forward(model, torch.tensor([prompt_ids], device=device), cache,
                            logits_to_keep=1)
    y = choose(prefill.logits[-1])
    y_hidden = prefill.hidden[-1]
    _sync(device)
    stats.prefill_s = time.perf_counter() - t_start
    t = time.perf_counter()
    drafter.begin(prompt_ids, prefill.hidden)
    stats.retrieval_s += time.perf_counter() - t
    seq = prompt_ids + [y]
    emitted = [y]

    while True:
        # Commit what this step emitted, stopping on EOS, the token budget or a stop string.
        before = len(out)
        for tok in emitted:
            out.append(tok)
            if tok in stops:
                stats.stopped_by = "eos"
                break
            if len(out) >= config.max_new_tokens:
                stats.stopped_by = "max_new_tokens"
                break
        if config.stop_strings:
            text = tokenizer.decode(out, skip_special_tokens=True)
            if _first_stop(text, config.stop_strings) >= 0:
                for j in range(before + 1, len(out) + 1):  # shortest output with the stop
                    part = tokenizer.decode(out[:j], skip_special_tokens=True)
                    if _first_stop(part, config.stop_strings) >= 0:
                        del out[j:]
                        break
                stats.stopped_by = "stop_string"
        if on_token is not None and len(out) > before:
            on_token(out[before:], stream.update(out))
        if stats.stopped_by:
            break

        # Draft.
        remaining = config.max_new_tokens - len(out)
        step_budget = dataclasses.replace(budget, draft_len=min(budget.draft_len, remaining - 1))
        t = time.perf_counter()
        if step_budget.draft_len > 0 and step_budget.num_drafts > 0:
            request = DraftRequest(seq, y_hidden, step_budget.num_drafts, step_budget.draft_len)
            drafts = drafter.propose(request)
        else:
            drafts = []
        tree = DraftTree.build(y, drafts, step_budget, vocab_size=vocab)
        stats.retrieval_s += time.perf_counter() - t

        # Verify.
        t = time.perf_counter()
        past = cache.get_seq_length()
        result = verify_tree(model, tree, cache)
        path, next_token = _walk(tree, result.logits, params, generator)
        prune_cache(cache, past, len(tree), path)
        _sync(device)
        verify_s = time.perf_counter() - t
        stats.verify_s += verify_s

        accepted = [tree.tokens[i] for i in path[1:]]
        stats.steps += 1
        stats.tree_tokens += len(tree)
        stats.accepted_tokens += len(accepted)
        if len(tree) > 1:
            stats.proposed_tokens += len(path) - 1 + tree.height_below(path[-1])

        t = time.perf_counter()
        drafter.accept([y] + accepted, result.hidden[path])
        drafter.verified(len(tree), verify_s)
        stats.retrieval_s += time.perf_counter() - t

        emitted = accepted + [next_token]
        seq.extend(emitted)
        y, y_hidden = next_token, result.hidden[path[-1]]

    _sync(device)
    stats.total_s = time.perf_counter() - t_start
    stats.new_tokens = len(out)
    # Emitted tokens cut by EOS or the budget do not count towards AL.
    stats.step_tokens = max(0, len(out) - 1)
    text = tokenizer.decode(out, skip_special_tokens=True)
    if stats.stopped_by == "stop_string":
        text = text[: _first_stop(text, config.stop_strings)]
    return GenerationResult(text=text, tokens=out, prompt_tokens=prompt_ids, stats=stats)


def _walk(tree: DraftTree, logits: torch.Tensor, params: SamplingParams,
          generator: torch.Generator) -> tuple[list[int], int]:
    """Accepted path (tree node indices, root first) and the model's token after it."""
    path = [0]
    node = 0
    if params.greedy:
        choice = logits.argmax(-1).tolist()  # one device sync for the whole tree
        while True:
            child = tree.children(node).get(choice[node])
            if child is None:
                return path, choice[node]
            path.append(child)
            node = child
    while True:
        probs = target_probs(logits[node], params)
        children = tree.children(node)
        if not children:
            return path, sample(probs, generator)
        token, accepted = accept_among_children(probs, list(children), generator)
        if not accepted:
            return path, token
        node = children[token]
        path.append(node)
