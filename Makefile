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

# Installs kdpipe, provisions Fashion-MNIST (scripts/provision.sh: Debian package, else torchvision's download)
# and runs the default pipeline (pipeline.yaml) end to end on it. OMP_WAIT_POLICY=PASSIVE (unless set): PyTorch's
# OpenMP threads sleep instead of spinning while they wait, so a machine that is busy with other work does not make
# them burn their share spinning (measured on 2 busy cores: training 4-8x faster in wall time).
demo: install
	@PYTHON=$(BIN)/python scripts/provision.sh data
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/kdpipe run -c pipeline.yaml
	$(BIN)/kdpipe report --format md

# Installs kdpipe and what its tests need (scripts/provision.sh: Fashion-MNIST, OpenSSH, Chromium), then runs the
# suite; a tool that cannot be installed here is reported loudly and its tests skip, saying why (-ra).
test: install
	@PYTHON=$(BIN)/python scripts/provision.sh test
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf .kdpipe kdpipe-out
