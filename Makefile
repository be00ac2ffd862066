# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
# torch/torchvision pinned to the releases this project is tested with; pip never picks a newer torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
ARGS ?=
# test workers (pytest-xdist; each runs one compute thread, see tests/conftest.py): 2 suits a 2-core machine
TEST_WORKERS ?= 2
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu for CPU-only torch wheels (~0.2 GB instead of ~6 GB of CUDA)
TORCH_INDEX ?=

.PHONY: install train test test-fast benchmark notebooks clean

install: $(STAMP)

# Re-runs only when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[test]" $(TORCH_PINS)
	touch $(STAMP)

train: install
	$(BIN)/python train.py $(ARGS)

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow" $(ARGS)

benchmark: install
	$(BIN)/python benchmarks/data_pipeline.py $(ARGS)

# JupyterLab (the `notebooks` extra, installed on first use) on notebooks/.
notebooks: install
	$(BIN)/python -c "import jupyterlab" 2>/dev/null || $(BIN)/python -m pip install --quiet -e ".[notebooks]" $(TORCH_PINS)
	$(BIN)/jupyter lab notebooks/ $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
