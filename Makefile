# One command sets everything up and runs the main job; one sets everything up and runs the tests.
#   make demo   -> .venv with torch first, then kvfree; runs the main job
#   make test   -> same environment; runs the fast test suite (what CI runs)
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# where torch comes from when no local wheel of TORCH_SPEC is found (PIP_FIND_LINKS): the CPU
# build by default (PyPI's Linux torch is the CUDA one, GBs of nvidia packages);
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu126 on a GPU machine
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvfree-installed

.PHONY: setup demo test test-slow lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	if $(BIN)/pip download -q --no-index --no-deps -d $(VENV)/.wheels "$(TORCH_SPEC)" 2>/dev/null; \
	then $(BIN)/pip install -q "$(TORCH_SPEC)"; \
	else $(BIN)/pip install -q "$(TORCH_SPEC)" --index-url "$(TORCH_INDEX)" \
	  || $(BIN)/pip install -q torch --index-url "$(TORCH_INDEX)"; fi
	$(BIN)/pip install -q -e ".[dev,text,hf,eval]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/kvfree demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow --durations=15

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
