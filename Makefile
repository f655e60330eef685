# sotu-delta: `make demo` shows the main job on the committed fixtures; `make test` runs every
# test. Both install what they need (the Python reference's packages go into .venv).

SHELL   := bash
CARGO   ?= cargo
PYTHON  ?= python3
BIN     := target/release/sotu-delta
VENV    := .venv
PY      := $(VENV)/bin/python
FIX     := fixtures/tiny
DEMO    := target/demo

.PHONY: all build venv test lint demo bench bench-small fixtures clean

all: build

build:
	$(CARGO) build --release --locked

$(VENV)/.installed: tests/reference/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/reference/requirements.txt
	touch $@

venv: $(VENV)/.installed

# Rust unit, property and CLI tests, then the independent numpy reference against the binary.
test: build venv
	$(CARGO) test --release --locked
	SOTU_BIN=$(BIN) $(PY) -m pytest -q tests/reference

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets --locked -- -D warnings

# Three task deltas in disjoint slots of one seed, inspected, merged and verified.
demo: build
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	@set -e; for k in 0 1 2; do \
	  cmd="$(BIN) extract --base $(FIX)/base-bf16.safetensors --tuned $(FIX)/task$$((k+1))-bf16.safetensors --slot $$k/3 --seed 7 -o $(DEMO)/task$$((k+1)).delta.safetensors"; \
	  echo "\$$ $$cmd"; $$cmd; echo; done
	@cmd="$(BIN) inspect --summary $(DEMO)/task1.delta.safetensors $(DEMO)/task2.delta.safetensors $(DEMO)/task3.delta.safetensors"; echo "\$$ $$cmd"; $$cmd; echo
	@cmd="$(BIN) merge --base $(FIX)/base-bf16.safetensors $(DEMO)/task1.delta.safetensors $(DEMO)/task2.delta.safetensors $(DEMO)/task3.delta.safetensors -o $(DEMO)/merged.safetensors"; echo "\$$ $$cmd"; $$cmd; echo
	@cmd="$(BIN) verify --base $(FIX)/base-bf16.safetensors $(DEMO)/task1.delta.safetensors $(DEMO)/task2.delta.safetensors $(DEMO)/task3.delta.safetensors"; echo "\$$ $$cmd"; $$cmd

# sotu-delta against the physical floor (cp of the same bytes); data cached under target/bench.
bench: build
	$(PYTHON) tests/bench/bench.py --size tinyllama

bench-small: build
	$(PYTHON) tests/bench/bench.py --size small

# Regenerates the committed fixtures (byte-identical output).
fixtures: venv
	$(PY) fixtures/make_fixtures.py

clean:
	$(CARGO) clean
	rm -rf $(VENV)
