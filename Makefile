# itvnode — the two commands sites use are `make run` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# torch from the machine's local wheels (x86_64, Python 3.11); override for CUDA images.
TORCH   ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install run test lint bench clean

$(BIN)/itvnode: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[engine,seg,eval,dev]'
	@touch $@

install: $(BIN)/itvnode

run: install
	$(BIN)/itvnode run

lint: install
	$(BIN)/ruff check itvnode itvnode_version.py service worker models bench tests
	$(BIN)/mypy
	$(BIN)/lint-imports

test: install
	tests/peers.sh
	$(BIN)/ruff check itvnode itvnode_version.py service worker models bench tests
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

# Each script prints its numbers against a peer measured in the same run; run as modules from the repository root
# (bench/ and tests/support/ are packages there, no sys.path edits).
BENCHES ?= ingest hostile assembler load threshold postprocess itv_motion artifacts rtstruct qa_report export e2e soak gpu_infer train_memory

bench: install
	@for b in $(BENCHES); do echo "== bench.$$b"; $(BIN)/python -m bench.$$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
