"""The dead-letter output: input the builder could not use, with the reason, one file per run."""

from __future__ import annotations

import logging
from collections import Counter

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.documents import DeadLetter
from schemas import DEAD_LETTER_SCHEMA
from schemas.atomic import replacing
from schemas.storage import Store, staged, store_io

log = logging.getLogger(__name__)

DEAD_LETTER_DIR = "dead_letter"


def write_dead_letters(letters: list[DeadLetter], path: str) -> int:
    if not letters:
        return 0
    letters = sorted(letters, key=lambda d: d.source)
    table = pa.table(
        {
            "source": [d.source for d in letters],
            "reason": [d.reason for d in letters],
            "excerpt": [d.excerpt for d in letters],
        },
        schema=DEAD_LETTER_SCHEMA,
    )
    with replacing(path) as tmp:
        pq.write_table(table, str(tmp))
    return len(letters)


def dead_letter_relpath(generation: int) -> str:
    return f"{DEAD_LETTER_DIR}/gen-{generation:06d}.parquet"


def write_store_dead_letters(letters: list[DeadLetter], store: Store, generation: int) -> int:
    """``write_dead_letters`` into a store, local or remote (written here, then uploaded)."""
    if not letters:
        return 0
    with staged(store) as root:
        return write_dead_letters(letters, str(root / dead_letter_relpath(generation)))


def read_dead_letters(store: Store, generation: int) -> list[DeadLetter]:
    try:
        data = store_io(store).read(dead_letter_relpath(generation))
    except FileNotFoundError:
        return []
    return [DeadLetter(**row) for row in pq.read_table(pa.BufferReader(data)).to_pylist()]


def summarize(letters: list[DeadLetter]) -> str:
    """One line per reason kind, e.g. ``3 x malformed JSON``; the text before any detail."""
    kinds = Counter(d.reason.split(":")[0].split(" (")[0] for d in letters)
    return "; ".join(f"{n} x {k}" for k, n in kinds.most_common())


class WriteDeadLetters(beam.PTransform):
    """DeadLetters -> a Parquet file under STORE/dead_letter/ (nothing when there are none)."""

    def __init__(self, store: str, generation: int):
        super().__init__()
        self.store = store_io(store)
        self.generation = generation

    def expand(self, letters):
        return (
            letters
            | "Collect" >> beam.combiners.ToList()
            | "Write" >> beam.Map(write_store_dead_letters, self.store, self.generation)
        )
