"""The benchmark's stores, built once through the real pipelines and cached under ``runs/``.

- OOD: Python standard-library sources (code the model was not asked about).
- ID: the model's own greedy completions of in-domain prompts: HumanEval's held-out problems
  (every one after the benchmark's ``EVAL_PROMPTS``) and prompts made from standard-library
  function signatures and docstrings in HumanEval's shape. No evaluated problem is in it.
- A requests family's ID store (howto, errors): the model's answers to the family's store-side
  requests (``requests_store``).

Both are rebuilt only when their directory has no published manifest, so an interrupted build
is simply run again.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from benchmarks.prompts import (
    INSTRUCTION,
    heldout_humaneval_prompts,
    stdlib_signature_prompts,
    stdlib_sources,
    write_prompt_jsonl,
)
from schemas import StoreFormatError, read_manifest
from schemas.commit import newest_generation

RUNS = Path(__file__).resolve().parent.parent / "runs"
T = TypeVar("T")


def take_until(items: Iterable[T], count_tokens: Callable[[T], int | None],
               max_tokens: int) -> tuple[list[T], int]:
    """Items in order until they hold about ``max_tokens`` tokens, and their total. An item
    that would overshoot the target by more than 10% is passed over, one whose count is None
    is skipped."""
    chosen, total = [], 0
    for item in items:
        if total >= max_tokens:
            break
        n = count_tokens(item)
        if n is None or total + n > max_tokens * 1.1:
            continue
        chosen.append(item)
        total += n
    return chosen, total


def stdlib_corpus(dest: Path, max_tokens: int, tokenizer) -> Path:
    """Copy standard-library modules into ``dest`` until they hold about ``max_tokens``."""
    done = dest / ".complete"
    if done.exists():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)

    def count(item):
        text = item[1].read_text(encoding="utf-8", errors="replace")
        return len(tokenizer(text)["input_ids"])

    chosen, total = take_until(enumerate(stdlib_sources()), count, max_tokens)
    for i, path in chosen:
        shutil.copyfile(path, dest / f"{i:04d}_{path.name}")
    done.write_text(json.dumps({"tokens": total}))
    return dest


def model_tag(model: str) -> str:
    """A directory-name suffix per target model, so stores of different models never mix."""
    if model == "default":
        return ""
    import hashlib

    name = "".join(c if c.isalnum() else "-" for c in Path(model).name)[:40]
    return f"-{name}-{hashlib.sha256(str(Path(model).resolve()).encode()).hexdigest()[:8]}"


def _options(build: dict) -> str:
    return "".join(f"-{k}{v}" for k, v in sorted(build.items()))


def _built(store: Path) -> bool:
    """A generation is committed (CURRENT is only a hint: a crash may have left it behind) in
    the format this code reads; a store of an older format is rebuilt."""
    if not (store.is_dir() and newest_generation(store) > 0):
        return False
    try:
        read_manifest(store)
    except StoreFormatError as e:
        print(f"rebuilding {store}: {e}", file=sys.stderr, flush=True)
        return False
    return True


def _fresh(store: Path) -> None:
    if store.exists():  # a build that died before publishing: start over
        shutil.rmtree(store)


def ood_store(model: str, max_tokens: int, root: Path = RUNS, **build) -> Path:
    """Store over ``max_tokens`` of standard-library sources (Beam imported only to build)."""
    tag = model_tag(model)
    store = root / f"store-ood-{max_tokens // 1000}k{tag}{_options(build)}"
    if _built(store):
        return store
    from pipelines.build import build_store
    from pipelines.config import BuildConfig
    from pipelines.tokenize import load_tokenizer

    tokenizer, _ = load_tokenizer(model)
    corpus = stdlib_corpus(root / f"corpus-ood-{max_tokens // 1000}k{tag}", max_tokens, tokenizer)
    print(f"building the OOD store from {corpus} ...", file=sys.stderr, flush=True)
    _fresh(store)
    build_store(corpus, store, BuildConfig(model=model, glob="**/*.py", **build))
    return store


def completions(prompts: list[str], dest: Path, model: str, max_new_tokens: int,
                template: str = INSTRUCTION) -> Path:
    """``dest``: the model's greedy completions of ``prompts`` (JSONL), generated once; each
    prompt is the user's message ``template.format(code=prompt)``."""
    if dest.exists():
        return dest
    src = write_prompt_jsonl(prompts, dest.parent / "prompts" / dest.name, template)
    from pipelines.config import GenerateConfig
    from pipelines.generate import generate_corpus

    print(f"generating {len(prompts)} completions into {dest} ...", file=sys.stderr, flush=True)
    tmp = dest.with_name(f".{dest.name}.tmp")  # not matched by the store's *.jsonl glob
    generate_corpus(src, tmp, GenerateConfig(model=model, max_new_tokens=max_new_tokens,
                                             batch_size=16))
    tmp.rename(dest)
    return dest


def id_store(model: str, num_prompts: int, humaneval: bool = True, max_new_tokens: int = 256,
             root: Path = RUNS, **build) -> Path:
    """Store over the model's own completions of ``num_prompts`` stdlib signature prompts and,
    with ``humaneval``, of HumanEval's held-out problems. Beam is imported only to build, so a
    built store can be reused where the pipelines' dependencies are not installed."""
    tag = model_tag(model)
    heldout = heldout_humaneval_prompts() if humaneval else []
    he = f"-he{len(heldout)}" if heldout else ""
    store = root / f"store-id-{num_prompts}{he}{tag}{_options(build)}"
    if _built(store):
        return store
    from pipelines.build import build_store
    from pipelines.config import BuildConfig

    corpus = root / f"corpus-id-{num_prompts}{he}{tag}"
    completions(stdlib_signature_prompts(num_prompts), corpus / "completions.jsonl", model,
                max_new_tokens)
    if heldout:
        completions(heldout, corpus / "humaneval.jsonl", model, max_new_tokens)
    print(f"building the ID store from {corpus} ...", file=sys.stderr, flush=True)
    _fresh(store)
    build_store(corpus, store, BuildConfig(model=model, glob="*.jsonl", **build))
    return store


def requests_store(model: str, family: str, num_prompts: int, max_new_tokens: int = 256,
                   root: Path = RUNS, **build) -> Path:
    """Store over the model's own answers to ``num_prompts`` store-side requests of a requests
    family (benchmarks.prompts.FAMILIES: howto, errors; never a module or package the
    evaluation requests name)."""
    from benchmarks.prompts import FAMILIES

    tag = model_tag(model)
    store = root / f"store-{family}-{num_prompts}{tag}{_options(build)}"
    if _built(store):
        return store
    from pipelines.build import build_store
    from pipelines.config import BuildConfig

    corpus = root / f"corpus-{family}-{num_prompts}{tag}"
    completions(FAMILIES[family].store_prompts(num_prompts), corpus / "answers.jsonl", model,
                max_new_tokens, template="{code}")
    print(f"building the {family} store from {corpus} ...", file=sys.stderr, flush=True)
    _fresh(store)
    build_store(corpus, store, BuildConfig(model=model, glob="*.jsonl", **build))
    return store
