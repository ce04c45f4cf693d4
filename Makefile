# Two commands do everything on a fresh machine with Python 3.11: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export KAMENG_DATA_DIR ?= var

.PHONY: run test lint typecheck unit venv demo migrate bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11+)"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

migrate: $(STAMP)
	$(BIN)/kameng migrate

demo: migrate
	$(BIN)/kameng demo

run: demo
	@echo
	@echo "kameng is starting on http://127.0.0.1:8000"
	@echo "  storefront (buy, pay, track)  http://127.0.0.1:8000/"
	@echo "  demo buyer login          buyer@kameng.test / $$($(BIN)/python -c 'import json; print(json.load(open("$(KAMENG_DATA_DIR)/demo-credentials.json"))["member_password"])')  (¥100 balance; or buy as a guest)"
	@echo "  demo payment gateway      http://127.0.0.1:8702/_sim/state  (EPay simulator: click 确认支付 Pay)"
	@echo "  Reseller API docs         http://127.0.0.1:8000/api/v1/docs"
	@echo "  OpenAPI                   http://127.0.0.1:8000/api/v1/openapi.json"
	@echo "  health / metrics          http://127.0.0.1:8000/healthz  /metrics"
	@echo "  demo supplier (simulator) http://127.0.0.1:8701/_sim/state"
	@echo "  demo reseller: the api_key / api_secret printed above"
	@echo "  every demo credential (generated for this installation): $(KAMENG_DATA_DIR)/demo-credentials.json"
	@echo "  buy a key from another terminal:  $(BIN)/python examples/buy.py STEAM-50"
	@echo "  a top-up procured upstream:       $(BIN)/python examples/buy.py PHONE-50 1 phone=13800138000"
	@echo
	$(BIN)/kameng serve --demo-supplier --demo-gateway

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy

# One pytest worker per core (at most 4): each has its own throwaway PostgreSQL cluster and its
# own SQLite files, so tests never share rows. `make test TEST_WORKERS=0` runs in one process.
TEST_WORKERS ?= auto
test: lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --maxprocesses 4

bench: $(STAMP)
	$(BIN)/python bench/stock_import.py
	$(BIN)/python bench/orders.py --db sqlite
	$(BIN)/python bench/orders.py --db postgresql
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/payments.py
	# exits 1 when a target is missed (see docs/benchmarks.md); the other figures still print
	-$(BIN)/python bench/risk_dataset.py

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
