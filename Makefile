# The two commands of the README:  `make demo`  (the embedded default)  and  `make test`  (the suite).
# Both create .venv from the pinned requirements on first use, so they work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: venv test test-sglang test-fast demo bench-verifier clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first and pinned: anything unpinned would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q torch==2.13.0 -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: venv
	@start=$$(date +%s); \
	$(BIN)/python -m pytest tests --durations=20 $(PYTEST_ARGS); rc=$$?; \
	echo "test suite wall time: $$(( $$(date +%s) - start )) s"; exit $$rc

# The `sglang` tier: real SGLang 0.5.21 servers on CPU (tools/sglang_cpu/README.md). The first use builds
# their environment (~13 min, cached outside the checkout); a build failure fails this target with its reason.
test-sglang: venv
	@start=$$(date +%s); \
	sgpy=$$($(BIN)/python tools/sglang_cpu/build_env.py) || { echo "test-sglang: FAILED: the CPU SGLang environment could not be built (reason above)"; exit 1; }; \
	echo "test-sglang: env ready after $$(( $$(date +%s) - start )) s: $$sgpy"; \
	MEGATRON_OREAL_SGLANG_PYTHON=$$sgpy $(BIN)/python -m pytest tests -m sglang --durations=20 $(PYTEST_ARGS); rc=$$?; \
	echo "sglang tier wall time: $$(( $$(date +%s) - start )) s"; exit $$rc

test-fast: venv
	$(BIN)/python -m pytest tests -m "not slow" $(PYTEST_ARGS)

demo: venv
	$(BIN)/python -m megatron_oreal train examples/tiny/oreal.yaml

bench-verifier: venv  # Math-Verify goes in its own venv (~/.cache/megatron-oreal/bench-venv), not .venv
	$(BIN)/python tools/bench_verifier.py --setup

clean:
	rm -rf $(VENV) runs .pytest_cache
