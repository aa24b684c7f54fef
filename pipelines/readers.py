"""Corpus readers: JSONL and Parquet prompt/response records, and text files from a glob.

A reader never raises on bad input: every record it cannot use becomes a ``DeadLetter`` on the
``dead`` output with the reason, and the rest of the corpus goes on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import apache_beam as beam

from pipelines.documents import ChatDocument, DeadLetter, Document, TextDocument
from pipelines.stage_clock import stage_clock
from schemas.errors import StorageError
from schemas.storage import describe_kind, file_size, is_remote, list_files, open_input

DEAD = "dead"


def list_corpus_files(corpus: str | os.PathLike | Iterable, glob: str) -> list[str]:
    """Files of a corpus: record files as given, directories expanded with ``glob``."""
    paths = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    files: list[str] = []
    for p in paths:
        if is_remote(p):  # s3://, gs://, ...: listed through the filesystem layer
            found = list_files(str(p), glob)
            if found is None:
                raise FileNotFoundError(f"corpus path {p} does not exist")
            if not found:
                raise FileNotFoundError(f"no files match {glob!r} under {p}")
            files.extend(found)
            continue
        p = Path(p).absolute()  # workers resolve paths in their own working directory
        if p.is_dir():
            found = sorted(f for f in p.glob(glob) if f.is_file())
            if not found:
                raise FileNotFoundError(f"no files match {glob!r} under {p}")
            files.extend(str(f) for f in found)
        elif p.is_file():
            files.append(str(p))
        elif p.exists():
            raise ValueError(f"corpus path {p} is {describe_kind(p)}, not a file or a directory")
        else:
            raise FileNotFoundError(f"corpus path {p} does not exist")
    return files


def utf8_error(text: str) -> str:
    """Why ``text`` has no UTF-8 encoding ('' when it has one).

    Valid JSON can still carry a lone surrogate (``"\\ud800"``), which decodes to a Python
    string that fails at the first ``encode``; caught here, it becomes a dead letter instead
    of an exception that stops the whole pipeline.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"{e.reason} at character {e.start}"
    return ""


def _chat(source: str, record, prompt_field: str, response_field: str) -> Document | DeadLetter:
    if not isinstance(record, dict):
        return DeadLetter.of(source, f"record is a {type(record).__name__}, not an object",
                             json.dumps(record)[:200])
    for name in (prompt_field, response_field):
        if name not in record:
            return DeadLetter.of(source, f"missing field {name!r}", json.dumps(record, default=str))
        if not isinstance(record[name], str):
            return DeadLetter.of(source, f"field {name!r} is {type(record[name]).__name__}, "
                                 "not a string", json.dumps(record, default=str))
    for name in (prompt_field, response_field):
        bad = utf8_error(record[name])
        if bad:
            return DeadLetter.of(source, f"field {name!r} is not UTF-8 text: {bad}",
                                 json.dumps(record))
        if "\x00" in record[name]:
            return DeadLetter.of(source, f"field {name!r} holds binary content (NUL byte)",
                                 json.dumps(record))
    prompt, response = record[prompt_field], record[response_field]
    if not response.strip():
        return DeadLetter.of(source, f"empty field {response_field!r}", json.dumps(record))
    return ChatDocument(source=source, prompt=prompt, response=response)


def read_jsonl(path: str, prompt_field: str, response_field: str) -> Iterator[Document | DeadLetter]:
    with open_input(path) as f:
        for lineno, raw in enumerate(f, 1):
            source = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield DeadLetter.of(source, f"not UTF-8: {e.reason} at byte {e.start}", raw)
                continue
            except json.JSONDecodeError as e:
                yield DeadLetter.of(source, f"malformed JSON: {e.msg} at column {e.colno}", raw)
                continue
            yield _chat(source, record, prompt_field, response_field)


def read_parquet(path: str, prompt_field: str, response_field: str) -> Iterator[Document | DeadLetter]:
    import pyarrow.parquet as pq

    with ExitStack() as stack:
        try:
            pf = pq.ParquetFile(stack.enter_context(open_input(path)))
        except StorageError:
            raise  # the storage is unreachable: the build stops and says so, nothing is skipped
        except Exception as e:  # noqa: BLE001 - any unreadable file is one dead letter
            yield DeadLetter.of(path, f"unreadable Parquet file: {e}")
            return
        missing = [f for f in (prompt_field, response_field) if f not in pf.schema_arrow.names]
        if missing:
            yield DeadLetter.of(path, f"missing field {missing[0]!r} "
                                f"(columns: {pf.schema_arrow.names})")
            return
        row = 0
        for batch in pf.iter_batches(columns=[prompt_field, response_field]):
            for record in batch.to_pylist():
                yield _chat(f"{path}#{row}", record, prompt_field, response_field)
                row += 1


def read_text_file(path: str, max_bytes: int) -> Iterator[Document | DeadLetter]:
    size = file_size(path)
    if size > max_bytes:
        yield DeadLetter.of(path, f"document is {size} bytes, over the limit of {max_bytes}")
        return
    with open_input(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        yield DeadLetter.of(path, f"not UTF-8: {e.reason} at byte {e.start}", raw[e.start:])
        return
    if not text.strip():
        yield DeadLetter.of(path, "empty document")
        return
    if "\x00" in text:
        yield DeadLetter.of(path, f"binary content: NUL byte at offset {text.index(chr(0))}")
        return
    yield TextDocument(source=path, text=text)


def read_file(path: str, prompt_field: str, response_field: str, max_doc_bytes: int):
    """Documents of one corpus file; dead letters go to the ``dead`` tagged output."""
    with stage_clock("read"):  # read whole, so the clock does not run the steps downstream
        items = list(_file_items(path, prompt_field, response_field, max_doc_bytes))
    yield from items


def _file_items(path: str, prompt_field: str, response_field: str, max_doc_bytes: int):
    if path.endswith(".jsonl"):
        items = read_jsonl(path, prompt_field, response_field)
    elif path.endswith(".parquet"):
        items = read_parquet(path, prompt_field, response_field)
    else:
        items = read_text_file(path, max_doc_bytes)
    for item in items:
        if isinstance(item, DeadLetter):
            yield beam.pvalue.TaggedOutput(DEAD, item)
        elif isinstance(item, ChatDocument) and len(item.prompt) + len(item.response) > max_doc_bytes:
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter.of(
                item.source, f"record is over the limit of {max_doc_bytes} characters",
                item.prompt))
        else:
            yield item


def batch_files(files: list[str], batch_bytes: int) -> list[list[str]]:
    """The files in order, in batches of about ``batch_bytes`` (a larger file is a batch of its
    own): the unit of work a task reads, tokenizes and encodes, so its memory does not grow
    with the corpus."""
    batches: list[list[str]] = []
    size = batch_bytes
    for f in files:
        n = file_size(f)
        if size + n > batch_bytes:
            batches.append([])
            size = 0
        batches[-1].append(f)
        size += n
    return batches


def read_batch(files: list[str], prompt_field: str, response_field: str, max_doc_bytes: int,
               dropped=None):
    """Documents of a batch of files, less those whose source ``dropped`` names
    (pipelines.dedupe.DroppedSources); dead letters go to the ``dead`` tagged output."""
    for path in files:
        for item in read_file(path, prompt_field, response_field, max_doc_bytes):
            if dropped is not None and (isinstance(item, beam.pvalue.TaggedOutput)
                                        or item.source in dropped):
                continue  # the first read reported the dead letters
            yield item


class ReadCorpus(beam.PTransform):
    """Batches of file paths (``batch_files``) -> Documents (main output) and DeadLetters
    (``dead``).

    With ``dropped`` (a singleton PCollection of ``DroppedSources``), a second read of the
    same batches: documents it names are skipped, and so are dead letters.
    """

    def __init__(self, batches: list[list[str]], prompt_field: str = "prompt",
                 response_field: str = "response", max_doc_bytes: int = 8_000_000,
                 dropped=None):
        super().__init__()
        self.batches = [list(b) for b in batches]
        self.prompt_field = prompt_field
        self.response_field = response_field
        self.max_doc_bytes = max_doc_bytes
        self.dropped = dropped

    def expand(self, pbegin):
        sides = [beam.pvalue.AsSingleton(self.dropped)] if self.dropped is not None else []
        return (
            pbegin
            | "Batches" >> beam.Create(self.batches)
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.FlatMap(read_batch, self.prompt_field, self.response_field,
                                     self.max_doc_bytes, *sides).with_outputs(DEAD, main="docs")
        )
