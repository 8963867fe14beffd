# Makefile: set-up, the service (the main job), the library demo and the tests; each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup chromium run demo test lint bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian's headless chromium, for the browser test; silent when it is already installed.
chromium:
	@scripts/ensure-chromium.sh

run: setup
	$(VENV)/bin/spsa-nas serve

demo: setup
	$(PY) -m spsa_nas.demo

lint: setup
	$(VENV)/bin/ruff check .

test: setup chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_spsa_resnet50.py
