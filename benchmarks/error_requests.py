"""Make the ``errors`` prompt family: users pasting an error a library raised and asking for help.

    .venv/bin/python benchmarks/error_requests.py            # writes benchmarks/prompt_sets/errors.json

Source: the error messages third-party libraries raise, taken from the sources of the packages
``make install`` puts in the virtualenv's site-packages: every ``raise SomeError("literal")``
whose literal is a plain sentence of 25-160 characters (no format placeholders), outside tests
and vendored code. No other family uses them: ``humaneval`` is HumanEval's problems and
standard-library signatures, ``howto`` the standard library's documented functions. The
messages are turned into requests as a user writes them, in four phrasings.

Split: packages whose name hashes to 0 mod ``EVAL_SHARE`` are evaluation-only, the others may
feed an in-domain store, so no evaluated request names a package a store's request names. Each
package gives at most ``PER_PACKAGE`` messages, so the large packages do not make up the family.

The installed packages' versions float with ``make install``, so the requests are written once
to a JSON file, committed with the package versions they came from, and read from there
(benchmarks.prompts). This family was made for issue 30 and is touched by no tuning or feature
choice: the node model's features and every tuned default were chosen on HumanEval and howto.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

OUT = Path(__file__).resolve().parent / "prompt_sets" / "errors.json"
TEMPLATES = (
    "I'm getting `{exc}: {msg}` from {package}. What does this error mean and how do I fix it?",
    "My script fails with this error from the `{package}` library:\n\n```\n{exc}: {msg}\n```\n\n"
    "What am I doing wrong? Show me the correct usage.",
    "What causes \"{msg}\" ({exc}) in {package}, and how can I avoid it? A short example "
    "would help.",
    "{package} raises {exc}: {msg}\n\nCan you explain why this happens and how to fix my code?",
)
EVAL_SHARE = 5
PER_PACKAGE = 24
SKIP_PARTS = {"tests", "test", "testing", "_vendor", "vendor", "vendored", "_vendored",
              "examples", "benchmarks"}


def digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def site_packages() -> Path:
    return Path(sysconfig.get_paths(vars={"base": sys.prefix, "platbase": sys.prefix})["purelib"])


def packages(root: Path) -> list[Path]:
    """Top-level public packages (directories with an ``__init__.py``)."""
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(("_", ".")) and "." not in p.name
                  and (p / "__init__.py").exists())


def error_messages(path: Path) -> list[tuple[str, str]]:
    """(exception name, message) of each ``raise Name("literal")`` in one file."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError):
        return []
    out = []
    for node in ast.walk(tree):
        call = node.exc if isinstance(node, ast.Raise) else None
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.args
                and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)
                and call.func.id.endswith(("Error", "Exception", "Warning"))):
            msg = " ".join(call.args[0].value.split())
            if (25 <= len(msg) <= 160 and not any(c in msg for c in "{}%`")
                    and len(msg.split()) >= 4):
                out.append((call.func.id, msg))
    return out


def version_of(package: str) -> str:
    dists = metadata.packages_distributions().get(package, [])
    for dist in dists:
        try:
            return f"{dist}=={metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return ""


def requests(root: Path) -> list[dict]:
    out = []
    for pkg in packages(root):
        seen, found = set(), []
        for path in sorted(pkg.rglob("*.py")):
            if SKIP_PARTS & set(path.relative_to(root).parts):
                continue
            for exc, msg in error_messages(path):
                if msg not in seen:
                    seen.add(msg)
                    found.append((exc, msg, str(path.relative_to(root))))
        found.sort(key=lambda f: digest(f"{pkg.name}:{f[1]}"))
        for exc, msg, where in found[:PER_PACKAGE]:
            template = TEMPLATES[digest(msg) % len(TEMPLATES)]
            out.append({"package": pkg.name, "file": where, "exception": exc, "message": msg,
                        "split": "eval" if digest(pkg.name) % EVAL_SHARE == 0 else "store",
                        "request": template.format(exc=exc, msg=msg, package=pkg.name)})
    return sorted(out, key=lambda r: digest(r["request"]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    root = site_packages()
    reqs = requests(root)
    names = sorted({r["package"] for r in reqs})
    doc = {"made_by": "benchmarks/error_requests.py", "python": sys.version.split()[0],
           "packages": {n: version_of(n) for n in names}, "requests": reqs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    ev = sum(r["split"] == "eval" for r in reqs)
    print(f"{len(reqs)} requests from {len(names)} packages ({ev} evaluation-only) -> {args.out}")


if __name__ == "__main__":
    main()
