# phivault: every target sets up what it needs on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= ./phivault-data

.PHONY: demo test test-fast test-faults lint bench bench-scaled system-deps clean help

help:
	@echo "make demo   - set up and run the embedded demo with sample patients"
	@echo "make test   - set up and run the whole test suite"
	@echo "make test-faults - only the fault tests of the scaled shape (real processes)"
	@echo "make lint   - ruff and mypy --strict on the package"
	@echo "make bench  - run the benchmarks (one JSON line each, last), bench-scaled included"
	@echo "make bench-scaled - the scaled shape beside the embedded one (PostgreSQL, NATS, Redis)"

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Debian packages that tests need (SoftHSM2 for the PKCS#11 key provider).
system-deps:
	@command -v softhsm2-util >/dev/null 2>&1 || { \
	  echo "installing softhsm2 (Debian package)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null) \
	  || echo "warning: could not install softhsm2; the PKCS#11 tests will be skipped"; }

# The whole suite on TEST_WORKERS processes (pytest-xdist; README, "Testing"); tests that
# share an expensive fixture, and the fault tests, run on one worker each (tests/conftest.py).
# TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q $(XDIST)

# The scaled shape's fault tests alone (they are part of `make test` too).
test-faults: $(STAMP) system-deps
	$(BIN)/python -m pytest -q tests/faults

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src

demo: $(STAMP)
	$(BIN)/python -m phivault.demo --data-dir $(DATA)-demo

bench: $(STAMP)
	@for b in bench/*_bench.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done
	@$(MAKE) --no-print-directory bench-scaled

# Issue 7's ratio: the scaled shape (2 workers, PostgreSQL, the JetStream audit stream and
# its sequencer, Redis: the machine's servers, as the tests use them) beside the embedded one.
bench-scaled: $(STAMP)
	@echo "== bench/fhir_bench.py --shape scaled"
	$(BIN)/python bench/fhir_bench.py --shape scaled --patients 4 --rounds 4 --duration 3

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(DATA)-demo
