# Two entry points, both self-contained on a fresh machine with Python 3.11, make and git:
#   make demo   set up .venv and run the main job
#   make test   set up .venv and run ruff, mypy, import-linter and pytest
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest explore clean bench-ring

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m bench.nf_demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

pytest: $(STAMP)
	$(PY) -m pytest

# The simulations once more, exploring: a fresh seed, printed first so that a red run can be
# replayed (S6_RANDOM=1 S6_NO_SHRINK=1 .venv/bin/python -m pytest TEST --hypothesis-seed=SEED),
# Hypothesis's ci profile overridden (tests/sim/settings.py), no shrinking; the fixed-seed
# replays ran with pytest above.  EXPLORE_EXAMPLES scales their max_examples.
EXPLORE := tests/sim/test_object_space_sim.py::test_object_space_keeps_its_invariants \
	tests/sim/test_object_space_scaling.py::test_object_space_keeps_its_invariants_across_scaling \
	tests/sim/test_ownership_sim.py::test_rules_keep_every_invariant \
	tests/store/core/test_barrier.py::TestBarrierMachine \
	tests/store/core/test_crash_sim.py
EXPLORE_EXAMPLES ?= 1

explore: $(STAMP)
	@SEED=$$($(PY) -c 'import random; print(random.randrange(2**32))'); \
	echo "simulations explore seed $$SEED"; \
	S6_RANDOM=1 S6_NO_SHRINK=1 S6_SIM_EXAMPLES=$(EXPLORE_EXAMPLES) \
		$(PY) -m pytest $(EXPLORE) --hypothesis-seed=$$SEED

test: lint typecheck pytest explore

bench-ring: $(STAMP)
	$(PY) -m bench.ring_balance

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
