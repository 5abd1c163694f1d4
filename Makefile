# One command sets everything up and runs the main job; one sets everything up and runs the tests.
#   make demo   -> .venv with torch first, then kvfree; runs the main job
#   make test   -> same environment; runs the fast test suite (what CI runs)
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvfree-installed

.PHONY: setup demo test test-slow lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,text]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/kvfree demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow --durations=15

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
