# Cascade: two set-up commands, `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= cpu
DEMO_DIR ?= runs/demo
export OMP_NUM_THREADS ?= 1
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test lint bench load clean

$(BIN)/cascade: pyproject.toml scripts/install_torch.sh
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 (apt-get install python3.11 python3.11-venv)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	TORCH=$(TORCH) scripts/install_torch.sh $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(BIN)/cascade

install: $(BIN)/cascade

demo: install
	$(BIN)/python -m scripts.demo --dir $(DEMO_DIR)

test: install
	scripts/with_redis.sh $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/cascade bench stages --scale large --out runs/bench/stages.json

load: install
	$(BIN)/cascade bench e2e --out runs/load/summary.json

clean:
	rm -rf $(VENV) runs .pytest_cache
