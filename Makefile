VENV ?= .venv
PY := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE ?= offline

.PHONY: install browser test lint typecheck docs demo clean

install: $(VENV)/.installed browser

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Headless Chromium and its driver for the browser tests of the HTML pages (Debian packages).
SUDO := $(shell test "$$(id -u)" -eq 0 || echo sudo)
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; \
	fi

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .

# Static types of the package (configured in pyproject.toml, [tool.mypy]).
typecheck: install
	$(VENV)/bin/mypy src/guided_flow

# The generated command reference, docs/cli.md (tests/test_reference.py compares it with the CLI).
docs: install
	$(PY) -m tools.command_reference

GF := $(VENV)/bin/guided-flow
DEMO := outputs/demo

# The embedded default end to end: stage 1, stage 2 (from stage 1's best checkpoint), then test.
demo: install
	rm -f $(DEMO)/stage1.ckpt $(DEMO)/stage2.ckpt
	$(GF) fit --config experiments/demo.yaml
	$(GF) fit --config experiments/demo_stage2.yaml
	$(GF) test --config experiments/demo_stage2.yaml --ckpt_path $(DEMO)/stage2.ckpt --results_dir $(DEMO)

clean:
	rm -rf outputs lightning_logs wandb .pytest_cache
