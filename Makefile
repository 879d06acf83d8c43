VENV ?= .venv
PY := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE ?= offline

.PHONY: install test lint demo clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .

demo: install
	$(PY) -m guided_flow.demo --out outputs/demo

clean:
	rm -rf outputs lightning_logs wandb .pytest_cache
