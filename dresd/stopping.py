"""When a generation stops, and the text it streams out on the way.

A generation stops at the first of: an EOS token (kept in the output), ``max_new_tokens``
tokens, the end of the model's context (prompt and output fill every position it has), or a stop
string (the output is cut to the shortest token prefix whose text contains one, and the returned
text ends just before it). ``GenerationStats.stopped_by`` says which: ``eos``,
``max_new_tokens``, ``context`` or ``stop_string``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def first_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Where the earliest stop string starts in ``text`` (-1: none does)."""
    hits = [text.find(s) for s in stop_strings if s and s in text]
    return min(hits) if hits else -1


def commit(out: list[int], emitted: Sequence[int], stops: set[int], limit: int,
           stop_strings: Sequence[str], decode: Callable[[list[int]], str],
           limit_reason: str = "max_new_tokens") -> str:
    """Append ``emitted`` to ``out`` up to the first stop; what stopped it ('' when nothing).

    EOS and the token budget (``limit`` tokens in ``out``, reported as ``limit_reason``: the
    ``max_new_tokens`` asked, or the ``context`` left) cut ``emitted`` where they occur. A stop
    string is searched in the decoded output and, when found, ``out`` is cut to its shortest
    prefix whose text holds it: only tokens of this step are dropped, since earlier steps held
    no stop string.
    """
    before = len(out)
    stopped_by = ""
    for tok in emitted:
        out.append(tok)
        if tok in stops:
            stopped_by = "eos"
            break
        if len(out) >= limit:
            stopped_by = limit_reason
            break
    if stop_strings and first_stop(decode(out), stop_strings) >= 0:
        for j in range(before + 1, len(out) + 1):
            if first_stop(decode(out[:j]), stop_strings) >= 0:
                del out[j:]
                break
        stopped_by = "stop_string"
    return stopped_by


class TextStream:
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
