"""The PyPI ``draftretriever`` package (ADED's trigram retriever) as a drafter: a baseline of the
decode benchmark, not a dresd source (see dresd.drafters.rest for why it is not REST).

Its index covers exactly a store's documents, one entry per document, cached beside REST's.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from dresd.drafters.base import Draft, Drafter, DraftRequest
from dresd.drafters.rest import cached_index, check_tokens


def build_draftretriever_index(docs: Iterable[Sequence[int]], path: str | os.PathLike,
                               vocab_size: int) -> Path:
    """Write a ``draftretriever`` index of ``docs`` (one entry per document) to the file
    ``path`` (written to a temporary file, then renamed) and return it."""
    import draftretriever

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = draftretriever.Writer(tmp, vocab_size=int(vocab_size) + 1)
        for doc in docs:
            arr = np.asarray(doc, dtype=np.int64)
            check_tokens(arr, vocab_size)
            writer.add_entry(arr.tolist())
        writer.finalize()
        del writer
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class DraftRetrieverDrafter(Drafter):
    """Drafts from the PyPI ``draftretriever`` package (ADED's trigram retriever): paths of
    up to 4 tokens that continue the context's last two tokens."""

    name = "draftretriever"

    def __init__(self, index_path: str | os.PathLike, choices: int = 64):
        import draftretriever

        if not Path(index_path).is_file():
            raise FileNotFoundError(f"no draftretriever index at {index_path}")
        self.reader = draftretriever.Reader(index_file_path=str(index_path))
        self.choices = max(2, int(choices))  # below 2 the package panics and aborts

    @classmethod
    def from_store(cls, store, cache_dir: str | os.PathLike | None = None,
                   **kwargs) -> DraftRetrieverDrafter:
        path = cached_index(store, "draftretriever", ".idx", cache_dir,
                             build_draftretriever_index)
        return cls(path, **kwargs)

    def propose(self, request: DraftRequest) -> list[Draft]:
        if len(request.tokens) < 2 or request.num_drafts < 1 or request.draft_len < 1:
            return []  # a query of fewer than 2 tokens aborts the process
        query = [int(request.tokens[-2]), int(request.tokens[-1])]
        paths = self.reader.search(query, choices=self.choices)[0]
        found = {tuple(t for t in p if t >= 0)[: request.draft_len] for p in paths}
        found.discard(())
        leaves = sorted((p for p in found if not any(q[: len(p)] == p and q != p for q in found)),
                        key=lambda p: (-len(p), p))[: request.num_drafts]
        longest = max((len(p) for p in leaves), default=1)
        return [Draft(p, len(p) / longest, self.name) for p in leaves]
