"""Build SuffixDecoding's suffix tree (Snowflake's Arctic Inference) from its own source.

The ``arctic-inference`` package needs vLLM and CUDA, but its suffix tree is a standalone C++
extension (``csrc/suffix_decoding``: suffix_tree.cc, bindings.cc, nanobind). This script
downloads the pinned source distribution from the package index, checks its sha256, takes that
directory alone, and installs it into the running interpreter's environment as the package
``arctic_suffix_tree`` (scikit-build-core + nanobind; a C++20 compiler is needed). The upstream
sources are compiled unchanged; only the install rule and the package's ``__init__`` are added.
``dresd.drafters.suffix`` wraps it as the ``suffix`` drafter.

    python benchmarks/build_suffix_tree.py          # `make suffix-tree`; a no-op when built
    python benchmarks/build_suffix_tree.py --force  # rebuild
"""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

PACKAGE = "arctic-inference"
VERSION = "0.3.0"
SDIST = f"arctic_inference-{VERSION}.tar.gz"
SHA256 = "7f22e3e1b1071c6061c0d6951be17c0fb50b08d06d6e543144c8f52faba60a36"
SOURCE_DIR = f"arctic_inference-{VERSION}/csrc/suffix_decoding/"
MODULE = "arctic_suffix_tree"

PYPROJECT = f"""\
[build-system]
requires = ["scikit-build-core>=0.10", "nanobind>=2.0"]
build-backend = "scikit_build_core.build"

[project]
name = "{MODULE.replace("_", "-")}"
version = "{VERSION}"
description = "SuffixDecoding's suffix tree from {SDIST} (csrc/suffix_decoding), unchanged"
license = {{text = "Apache-2.0"}}
requires-python = ">=3.10"

[tool.scikit-build]
wheel.packages = ["{MODULE}"]
"""

# appended to the upstream CMakeLists.txt: where the module goes in the wheel
INSTALL_RULE = f"\ninstall(TARGETS _C LIBRARY DESTINATION {MODULE})\n"

INIT = f'''"""SuffixDecoding's suffix tree, compiled from {SDIST} (Apache-2.0, Snowflake Inc.)."""

from {MODULE}._C import Draft, SuffixTree

SOURCE = "{SDIST}"
SHA256 = "{SHA256}"
__all__ = ["Draft", "SuffixTree", "SOURCE", "SHA256"]
'''


class _Links(html.parser.HTMLParser):
    """The hrefs of a PEP 503 'simple' project page."""

    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def index_url() -> str:
    """The package index pip uses here (PIP_INDEX_URL), else PyPI's simple index."""
    url = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    return url.rstrip("/") + "/"


def download_sdist() -> bytes:
    page_url = urllib.parse.urljoin(index_url(), f"{PACKAGE}/")
    with urllib.request.urlopen(page_url, timeout=60) as r:
        links = _Links()
        links.feed(r.read().decode("utf-8", "replace"))
    hrefs = [h for h in links.hrefs if urllib.parse.urlparse(h).path.endswith("/" + SDIST)]
    if not hrefs:
        raise SystemExit(f"{SDIST} is not listed on {page_url}")
    url = urllib.parse.urljoin(page_url, hrefs[0])
    with urllib.request.urlopen(url, timeout=120) as r:
        data = r.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{url}: sha256 {digest}, expected {SHA256}; not building it")
    return data


def write_project(sdist: bytes, root: Path) -> None:
    """The upstream csrc/suffix_decoding files plus a pyproject, install rule and __init__."""
    with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(SOURCE_DIR) and m.isfile()]
        names = {m.name[len(SOURCE_DIR):] for m in members}
        if not {"CMakeLists.txt", "suffix_tree.cc", "bindings.cc"} <= names:
            raise SystemExit(f"{SDIST} lacks {SOURCE_DIR}CMakeLists.txt, suffix_tree.cc or "
                             "bindings.cc")
        for m in members:
            rel = m.name[len(SOURCE_DIR):]
            if "/" in rel or rel.startswith("."):
                continue  # only the flat source directory
            (root / rel).write_bytes(tar.extractfile(m).read())
    cmake = root / "CMakeLists.txt"
    cmake.write_text(cmake.read_text() + INSTALL_RULE)
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / MODULE).mkdir()
    (root / MODULE / "__init__.py").write_text(INIT)


def installed() -> bool:
    probe = f"import {MODULE}; assert {MODULE}.SHA256 == {SHA256!r}"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if it is installed")
    args = ap.parse_args(argv)
    if installed() and not args.force:
        print(f"{MODULE} ({SDIST}) is installed")
        return 0
    print(f"building {MODULE} from {SDIST} ({SOURCE_DIR})", flush=True)
    with tempfile.TemporaryDirectory(prefix="suffix-tree-") as tmp:
        write_project(download_sdist(), Path(tmp))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--force-reinstall",
                        "--no-deps", tmp], check=True)
    if not installed():
        raise SystemExit(f"{MODULE} was built but does not import")
    print(f"installed {MODULE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
