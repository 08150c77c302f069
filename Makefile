# The two commands of the quick start: `make run` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup run test test-reverse lint format bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	scripts/setup.sh
	touch $@

run: setup
	$(VENV)/bin/miaotui serve

test: setup
	$(VENV)/bin/ruff check miaotui tests bench
	$(VENV)/bin/ruff format --check miaotui tests bench
	$(PY) -m pytest -q

# The same tests in reverse order: no test may depend on another having run first.
test-reverse: setup
	$(PY) -m pytest -q --reverse

format: setup
	$(VENV)/bin/ruff check --fix miaotui tests bench
	$(VENV)/bin/ruff format miaotui tests bench
