"""The decode loop: draft, merge into a tree, verify in one forward, accept, prune. Lossless.

State between steps: the KV cache holds the prompt and every committed token except ``y``, the
token the model decided last. Each step asks the drafter for continuations of ``y``, verifies the
tree rooted at ``y``, and commits ``y`` plus the accepted draft tokens; the token the model
chooses after the accepted path becomes the next ``y``. So each verify forward emits the accepted
draft tokens plus one token of the model's own.

The stages are functions of one ``_Decoding`` (the state above): ``_prefill`` decides the first
``y``; each step is ``_draft`` (the drafter's tree for ``y``), ``_verify`` (one forward over the
tree, the accepted path, the cache pruned to it) and ``_accept`` (the drafter and the state
advance past it); ``_commit`` hands each step's tokens to the output and says whether to stop
(dresd.stopping). The metrics are defined in dresd.stats.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from dresd.decode_config import BUDGET_POLICIES, DecodeConfig
from dresd.drafters.assemble import as_drafter
from dresd.drafters.base import Drafter, DraftRequest
from dresd.drafters.registry import DRAFTER_NAMES, drafter_names
from dresd.models import stop_token_ids, synchronize
from dresd.prompt import Prompt, check_plain_decoding, check_prompt, context_length, encode_prompt
from dresd.sampling import SamplingParams, accept_among_children, sample, target_probs
from dresd.stats import GenerationResult, GenerationStats
from dresd.stopping import TextStream, commit, first_stop
from dresd.store import Store
from dresd.tree import DraftTree, TreeBudget, TreeOutput, model_forward, prune_cache, verify_tree

__all__ = [
    "BUDGET_POLICIES", "DRAFTER_NAMES", "DecodeConfig", "GenerationResult", "GenerationStats",
    "Prompt", "TokenCallback", "as_drafter", "check_plain_decoding", "context_length",
    "drafter_names", "encode_prompt", "generate", "stop_token_ids",
]

TokenCallback = Callable[[list[int], str], None]


@dataclass
class _Decoding:
    """One generation's state. Invariants between steps: ``cache`` holds ``seq[:-1]``;
    ``seq[-1]`` is ``y``, decided from ``y_hidden``; ``out`` is the committed output."""

    model: object
    tokenizer: object
    drafter: Drafter
    config: DecodeConfig
    stats: GenerationStats
    t_start: float
    vocab: int = 0
    params: SamplingParams = field(init=False)
    budget: TreeBudget = field(init=False)
    stops: set[int] = field(init=False)
    generator: torch.Generator = field(init=False)
    cache: object = None
    seq: list[int] = field(default_factory=list)
    y_hidden: torch.Tensor | None = None
    out: list[int] = field(default_factory=list)
    # At most this many new tokens, and the stop reason on reaching it: max_new_tokens, or
    # fewer when the model's context has less room (a position past it does not exist).
    limit: int = field(init=False)
    limit_reason: str = "max_new_tokens"

    def __post_init__(self):
        self.limit = self.config.max_new_tokens
        self.params = self.config.sampling
        self.budget = self.config.tree_budget
        self.stops = stop_token_ids(self.model, self.tokenizer)
        self.generator = torch.Generator().manual_seed(self.config.seed)

    @property
    def y(self) -> int:
        return self.seq[-1]

    def choose(self, logits_row: torch.Tensor) -> int:
        """The model's token from one row of logits: argmax when greedy, else a sample."""
        if self.params.greedy:
            return int(logits_row.argmax())
        return sample(target_probs(logits_row, self.params), self.generator)

    def drafter_call(self, fn, *args):
        """Call into the drafter, its wall time counted in ``drafting_s``."""
        t = time.perf_counter()
        out = fn(*args)
        self.stats.drafting_s += time.perf_counter() - t
        return out


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
    DecodeConfig field may be passed as a keyword to override ``config``; each argument and
    field is checked by its name (TypeError, ValueError). Generation stops at EOS,
    ``max_new_tokens``, a stop string, or when prompt and output fill the model's context
    (``stats.stopped_by == "context"``; no draft tree reaches past it).
    """
    config = _config(config, overrides)
    _check_arguments(model, tokenizer, source, on_token)
    check_plain_decoding(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompt_ids = encode_prompt(tokenizer, prompt)
    check_prompt(model, prompt_ids, vocab)
    drafter = as_drafter(source, config, model, tokenizer)

    run = _Decoding(model, tokenizer, drafter, config, GenerationStats(len(prompt_ids)),
                    t_start=time.perf_counter(), vocab=vocab)
    context = context_length(model)
    if context is not None and context - len(prompt_ids) < config.max_new_tokens:
        run.limit, run.limit_reason = context - len(prompt_ids), "context"
    stream = TextStream(tokenizer)
    emitted = _prefill(run, prompt_ids)
    while not _commit(run, emitted, stream, on_token):
        tree = _draft(run)
        emitted = _accept(run, tree, _verify(run, tree))
    return _finish(run, prompt_ids)


def _config(config: DecodeConfig | None, overrides: dict) -> DecodeConfig:
    """``config`` (the defaults when None) with the keyword overrides, each a field's name."""
    if config is not None and not isinstance(config, DecodeConfig):
        raise TypeError(f"config must be a DecodeConfig or None, not {type(config).__name__}")
    fields = [f.name for f in dataclasses.fields(DecodeConfig)]
    for name in overrides:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise TypeError(f"generate() got an unexpected keyword argument {name!r} ({hint}"
                            f"the DecodeConfig fields are {', '.join(fields)})")
    return dataclasses.replace(config or DecodeConfig(), **overrides)


def _check_arguments(model, tokenizer, source, on_token) -> None:
    """Refuse a ``generate`` argument of the wrong kind, by its name, before any work."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError("model must be a loaded transformers causal LM (e.g. from "
                        f"dresd.models.load_model), not {type(model).__name__}")
    if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise TypeError("tokenizer must be a transformers tokenizer (e.g. from "
                        f"dresd.models.load_model), not {type(tokenizer).__name__}")
    if source is not None and not isinstance(source, (Drafter, Store)):
        raise TypeError("source must be a Drafter or a Store (or None), not "
                        f"{type(source).__name__}")
    if on_token is not None and not callable(on_token):
        raise TypeError("on_token must be None or a callable(new_tokens, new_text), not "
                        f"{type(on_token).__name__}")


def _prefill(run: _Decoding, prompt_ids: list[int]) -> list[int]:
    """Fill the cache with the prompt and decide the first ``y``; the tokens emitted: [y]."""
    from transformers import DynamicCache

    run.cache = DynamicCache()
    out = model_forward(run.model, torch.tensor([prompt_ids], device=run.model.device),
                        run.cache, logits_to_keep=1)
    y = run.choose(out.logits[-1])
    run.y_hidden = out.hidden[-1]
    synchronize(run.model.device)
    run.stats.prefill_s = time.perf_counter() - run.t_start
    run.drafter_call(run.drafter.begin, prompt_ids, out.hidden)
    run.seq = prompt_ids + [y]
    return [y]


def _commit(run: _Decoding, emitted: list[int], stream: TextStream,
            on_token: TokenCallback | None) -> bool:
    """Commit what a step emitted to the output (reporting it to ``on_token``); True to stop on
    EOS, the token budget (max_new_tokens, or the room left in the context) or a stop string."""
    before = len(run.out)
    run.stats.stopped_by = commit(
        run.out, emitted, run.stops, run.limit, run.config.stop_strings,
        lambda toks: run.tokenizer.decode(toks, skip_special_tokens=True), run.limit_reason)
    if on_token is not None and len(run.out) > before:
        on_token(run.out[before:], stream.update(run.out))
    return bool(run.stats.stopped_by)


def _draft(run: _Decoding) -> DraftTree:
    """The drafter's tree rooted at ``y``. Drafts are cut so that the step never emits more
    than the tokens left: accepted drafts plus the model's own token. Near the end of the
    context this also keeps every node's position (``len(seq) - 1`` + depth) inside it; a tree
    deeper than asked (a drafter may plan its own) is cut to that depth."""
    remaining = run.limit - len(run.out)
    budget = dataclasses.replace(run.budget, draft_len=min(run.budget.draft_len, remaining - 1))

    def build() -> DraftTree:
        if budget.draft_len > 0 and budget.num_drafts > 0:
            request = DraftRequest(run.seq, run.y_hidden, budget.num_drafts, budget.draft_len)
            return run.drafter.propose_tree(request, budget, run.vocab).cut(remaining - 1)
        return DraftTree(run.y)

    return run.drafter_call(build)


class _Verified(NamedTuple):
    path: list[int]  # accepted tree nodes, root first
    next_token: int  # the model's token after the path
    output: TreeOutput  # the forward over the whole tree
    seconds: float  # the verify pass's wall time


def _verify(run: _Decoding, tree: DraftTree) -> _Verified:
    """One forward over ``tree`` and the path it accepts; the cache keeps only the path's
    entries. The time covers the forward, the acceptance walk and the pruning."""
    t = time.perf_counter()
    past = run.cache.get_seq_length()
    output = verify_tree(run.model, tree, run.cache)
    path, next_token = _walk(tree, output.logits, run.params, run.generator)
    prune_cache(run.cache, past, len(tree), path)
    synchronize(run.model.device)
    seconds = time.perf_counter() - t
    run.stats.verify_s += seconds
    return _Verified(path, next_token, output, seconds)


def _accept(run: _Decoding, tree: DraftTree, v: _Verified) -> list[int]:
    """Count the step, tell the drafter what was committed and advance ``y``; the tokens
    emitted: the accepted draft tokens and the model's own."""
    accepted = [tree.tokens[i] for i in v.path[1:]]
    stats = run.stats
    stats.steps += 1
    stats.tree_tokens += len(tree)
    stats.accepted_tokens += len(accepted)
    if len(tree) > 1:
        stats.proposed_tokens += len(v.path) - 1 + tree.height_below(v.path[-1])

    def tell_drafter() -> None:
        run.drafter.accept([run.y] + accepted, v.output.hidden[v.path])
        run.drafter.verified(len(tree), v.seconds)

    run.drafter_call(tell_drafter)
    emitted = accepted + [v.next_token]
    run.seq.extend(emitted)
    run.y_hidden = v.output.hidden[v.path[-1]]
    return emitted


def _finish(run: _Decoding, prompt_ids: list[int]) -> GenerationResult:
    synchronize(run.model.device)
    stats = run.stats
    stats.total_s = time.perf_counter() - run.t_start
    stats.new_tokens = len(run.out)
    # Emitted tokens cut by EOS or the budget do not count towards AL.
    stats.step_tokens = max(0, len(run.out) - 1)
    text = run.tokenizer.decode(run.out, skip_special_tokens=True)
    if stats.stopped_by == "stop_string":
        text = text[: first_stop(text, run.config.stop_strings)]
    return GenerationResult(text=text, tokens=run.out, prompt_tokens=prompt_ids, stats=stats)


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
