# Two commands do all the set-up on a fresh machine:
#   make demo   # .venv, install, synthesize the cohort and run the demo job into demo-output/
#   make test   # .venv, install, run the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINT := $(VENV)/torch-constraint.txt
PYTEST_ARGS ?=

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml setup.py scripts/install_torch.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	bash scripts/install_torch.sh $(PY) $(CONSTRAINT)
	$(PY) -m pip install -q -c $(CONSTRAINT) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/volumevlm demo --out demo-output

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The linter (rules in pyproject.toml's [tool.ruff]); CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) demo-output
