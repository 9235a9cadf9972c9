# Set-up is idempotent: `make demo` and `make test` work on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

.PHONY: setup demo test test-fast test-lowest bench bench-quick bench-gpu lint docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: this resolves to the CPU wheel on these machines; a bare `torch`
	# would pull several GB of CUDA wheels. The package itself only asks for torch>=2.4.
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[all]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/refmodel demo

test: setup
	# REFMODEL_TEST_LOWEST=1: the lowest-versions job too (its venv builds in the background meanwhile)
	REFMODEL_TEST_LOWEST=1 $(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not ray"

# A selection of fast tests in .venv-lowest, made with the lowest versions pyproject declares for the core
# and the peft and serve extras (tests/test_lowest_versions.py; downloads them once, reuses the venv until
# the floors change). REFMODEL_TORCH_INDEX=URL|installed: where torch comes from (default: PyPI).
test-lowest: setup
	REFMODEL_TEST_LOWEST=1 $(BIN)/python -m pytest -q -m lowest tests/test_lowest_versions.py

bench: setup
	$(BIN)/python -m benchmarks.run_all

bench-gpu: setup  # the head, the policy loss and precompute on CUDA in bf16 (H=4096, V=128256)
	$(BIN)/python -m benchmarks.gpu

bench-quick: setup  # every benchmark at its small shape (minutes): checks they run, not figures to record
	$(BIN)/python -m benchmarks.run_all --quick

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy  # the whole package, Python 3.10 (files and overrides: pyproject [tool.mypy])

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict  # into site/ (open site/index.html); `$(BIN)/mkdocs serve` to preview

clean:
	rm -rf $(VENV) runs site .pytest_cache
