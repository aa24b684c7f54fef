"""What ``generate`` checks before decoding: the prompt's tokens, the room left in the model's
context, and that the model's generation config decodes plainly."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

Prompt = str | Sequence[int] | Sequence[dict]


def context_length(model) -> int | None:
    """The longest sequence the model's positions allow (None when its config names none)."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def lone_surrogate(text: str) -> int:
    """The index of the first lone surrogate in ``text`` (-1: none). Such a str is no Unicode
    text: it cannot be encoded, so no tokenizer takes it; non-UTF-8 bytes decoded with
    ``surrogateescape`` (as Python does with a command line) become these."""
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            return i
    return -1


def check_text(what: str, text: str) -> None:
    """Refuse a str with a lone surrogate, naming ``what`` and the character's position."""
    i = lone_surrogate(text)
    if i >= 0:
        raise ValueError(f"{what} is not valid Unicode text: lone surrogate at character {i} "
                         f"({text[i]!r}); decode the bytes it came from with their real "
                         "encoding (a UTF-8 str has no surrogates)")


_PROMPT_KINDS = "a str, a list of chat messages ({'role': ..., 'content': ...}) or a list of token ids"


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """A string is tokenized as is; a list of {role, content} goes through the chat template;
    a list of ints is taken as token ids. Anything else (bytes, None, a str that is not
    Unicode text, a list mixing kinds) is refused, naming what is wrong."""
    if prompt is None:
        raise TypeError(f"prompt is None: pass {_PROMPT_KINDS}")
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise TypeError(f"prompt is {type(prompt).__name__}: decode it to str first, or pass a "
                        "list of token ids")
    if isinstance(prompt, str):
        check_text("prompt", prompt)
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    elif not isinstance(prompt, Sequence):
        raise TypeError(f"prompt must be {_PROMPT_KINDS}, not {type(prompt).__name__}")
    elif len(prompt) and all(isinstance(m, dict) for m in prompt):
        for i, m in enumerate(prompt):
            content = m.get("content")
            if isinstance(content, str):
                check_text(f"prompt message {i}'s content", content)
        ids = tokenizer.apply_chat_template(
            list(prompt), add_generation_prompt=True, tokenize=True, return_dict=False
        )
    else:
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not isinstance(t, Integral):
                raise TypeError(f"prompt[{i}] is {type(t).__name__} {t!r:.40}: a list prompt holds "
                                "token ids (ints) or chat messages (dicts), not a mix")
        ids = list(prompt)
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("the prompt is empty")
    return ids


def check_prompt(model, prompt_ids: Sequence[int], vocab: int) -> None:
    """Refuse token ids outside the vocabulary, and a prompt that leaves no room to generate."""
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids outside the model's vocabulary of {vocab}: {bad[:5]}")
    context = context_length(model)
    if context and len(prompt_ids) >= context:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens, the model's context is "
                         f"{context} tokens: no room to generate (shorten the prompt)")


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
