# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv if it is missing and installs what it needs into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --progress-bar off --disable-pip-version-check -q

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.base: pyproject.toml | $(PY)
	$(PIP) -e .
	@touch $@

$(VENV)/.test: pyproject.toml | $(PY)
	$(PIP) -e '.[test]'
	@touch $@ $(VENV)/.base

demo: $(VENV)/.base
	$(VENV)/bin/resforge demo

test: $(VENV)/.test
	KERAS_BACKEND=torch $(PY) -m pytest

$(VENV)/.bench: pyproject.toml | $(PY)
	$(PIP) -e '.[bench]'
	@touch $@ $(VENV)/.base

# Speed and accuracy measurements (markdown tables; about 3.5 hours on 2 CPU cores, most of it defaults.py).
bench: $(VENV)/.bench
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/data_loader.py
	$(PY) benchmarks/inference_cpu.py
	$(PY) benchmarks/defaults.py
	$(PY) benchmarks/compress_fashion_mnist.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info .pytest_cache
