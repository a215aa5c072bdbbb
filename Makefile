# Every target creates .venv when it is missing; later runs reuse it.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# The CPU build first: a looser requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedtext demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy fedtext sdk orchestration runs models clients server privacy tenancy serving
	# DESIGN.md's import arrows and no cycle inside a package (.importlinter).
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

# Every fault test (tests/faults), the long ones too (real runs and resumes, PostgreSQL
# restarted under a run); `make test` runs only the quick ones. docs/RELIABILITY.md.
.PHONY: faults
faults: $(STAMP)
	FEDTEXT_FAULTS=all $(BIN)/python -m pytest -q -s -m faults tests/faults

bench: $(STAMP)
	@for b in $(filter-out bench/_%,$(wildcard bench/*.py)); do echo "== $$b"; $(BIN)/python $$b --quick || exit 1; done

# The web console's front end (console/) -> serving/console_static/, which is committed so
# that installs and `make test` need no Node. Run after changing console/src.
.PHONY: console
console:
	cd console && npm ci --no-audit --no-fund && npm run build

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
