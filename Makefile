# The project's verbs. `make demo` runs the product from a fresh clone; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHOP := var/demo/shop
SNAPSHOTS := var/snapshots
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install demo serve rebuild test lint bench-quality bench-gateway bench-stream bench-rules locust clean

$(BIN)/tailor: pyproject.toml constraints.txt
	scripts/install
	@touch $@

install: $(BIN)/tailor

$(SHOP)/events.csv: | $(BIN)/tailor
	$(BIN)/tailor synth --out $(SHOP) --users 2000 --items 5000 --events 200000 --seed 7

# The demo pins ALS: the tuner's EASE sweep takes minutes more on this 5,000-item shop, and the demo
# should be up in a minute or two.
DEMO_BUILD := --item-model als

$(SNAPSHOTS)/CURRENT: $(SHOP)/events.csv
	$(BIN)/tailor build --events $(SHOP)/events.csv --items $(SHOP)/items.jsonl --out $(SNAPSHOTS) $(DEMO_BUILD)

# Generate the demo shop and build its snapshot (once), then serve it on the embedded store.
demo: install $(SNAPSHOTS)/CURRENT serve

serve: install
	$(BIN)/tailor snapshots list --root $(SNAPSHOTS)
	$(BIN)/tailor warm --snapshots $(SNAPSHOTS)
	@echo "Gateway on http://$(HOST):$(PORT)  (demo shop: http://$(HOST):$(PORT)/demo; API page: http://$(HOST):$(PORT)/docs; Ctrl-C stops)"
	$(BIN)/tailor serve --snapshots $(SNAPSHOTS) --host $(HOST) --port $(PORT)

# A fresh snapshot of the demo shop; a running gateway swaps it in by itself.
rebuild: install
	$(BIN)/tailor build --events $(SHOP)/events.csv --items $(SHOP)/items.jsonl --out $(SNAPSHOTS) $(DEMO_BUILD)

test: install
	scripts/test

lint: install
	scripts/lint

bench-quality: install
	$(BIN)/python loadtests/bench_quality.py

bench-gateway: install
	$(BIN)/python loadtests/bench_gateway.py

bench-stream: install
	$(BIN)/python loadtests/bench_stream.py

# Needs the benchmark shop and snapshot that bench-gateway builds.
bench-rules: install
	$(BIN)/python loadtests/bench_rules.py

# A realistic mix for 60 s against a running gateway (`make demo` in another terminal).
locust: install
	TAILOR_SHOP=$(SHOP) TAILOR_SNAPSHOTS=$(SNAPSHOTS) $(BIN)/locust -f loadtests/locustfile.py \
		--headless -u 50 -r 10 -t 60s --host http://$(HOST):$(PORT) --only-summary

clean:
	rm -rf var .mypy_cache .ruff_cache .pytest_cache
