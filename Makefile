# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo test lint clean

$(BIN)/kdpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/kdpipe

# Installs kdpipe and runs the default pipeline (pipeline.yaml) end to end on real Fashion-MNIST.
demo: install
	@test -d /usr/share/datasets/fashion-mnist || test -n "$$KDPIPE_DATA" || \
	  (echo "Fashion-MNIST is missing: sudo apt-get install -y dataset-fashion-mnist (or set KDPIPE_DATA)"; exit 2)
	$(BIN)/kdpipe run -c pipeline.yaml
	$(BIN)/kdpipe report --format md

# Installs kdpipe and runs the test suite.
test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf .kdpipe kdpipe-out
