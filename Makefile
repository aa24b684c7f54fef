# Everything runs from the project's own virtualenv; `make install` creates it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUFFIX_STAMP := $(VENV)/.suffix-tree

.PHONY: install suffix-tree test test-fast lint demo bench model clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so the package install keeps it. Where the default index serves
	# the CUDA build, TORCH_INDEX=https://download.pytorch.org/whl/cpu picks the CPU one.
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# SuffixDecoding's suffix tree (the `suffix` drafter, a benchmark rival), compiled from the
# arctic-inference source distribution; needs a C++20 compiler. The tests and the decode
# benchmark use it; `make install` alone does not build it.
suffix-tree: $(SUFFIX_STAMP)

$(SUFFIX_STAMP): $(STAMP) benchmarks/build_suffix_tree.py
	$(BIN)/python benchmarks/build_suffix_tree.py
	touch $(SUFFIX_STAMP)

test: suffix-tree
	$(BIN)/python -m pytest -q tests

test-fast: suffix-tree
	$(BIN)/python -m pytest -q -m "not integration" tests

lint: install
	$(BIN)/ruff check dresd pipelines schemas tests benchmarks

demo: install
	$(BIN)/python benchmarks/demo.py

bench: suffix-tree
	$(BIN)/python benchmarks/decode.py

model: install
	$(BIN)/dresd model

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
