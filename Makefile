# The project's verbs. `make demo` runs the product from a fresh clone; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHOP := var/demo/shop
SNAPSHOTS := var/snapshots

.PHONY: install demo test lint typecheck unit bench-quality clean

$(BIN)/tailor: pyproject.toml
	scripts/install
	@touch $@

install: $(BIN)/tailor

demo: install
	$(BIN)/tailor synth --out $(SHOP) --users 2000 --items 5000 --events 200000 --seed 7
	$(BIN)/tailor build --events $(SHOP)/events.csv --items $(SHOP)/items.jsonl --out $(SNAPSHOTS)
	$(BIN)/tailor snapshots list --root $(SNAPSHOTS)

test: install
	scripts/test

lint: install
	scripts/lint

bench-quality: install
	$(BIN)/python loadtests/bench_quality.py

clean:
	rm -rf var .mypy_cache .ruff_cache .pytest_cache
