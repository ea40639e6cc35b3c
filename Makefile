# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv if it is missing and installs what it needs into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --progress-bar off --disable-pip-version-check -q

.PHONY: demo test bench clean chromium

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

# The page's test drives Debian's chromium; installed here when missing (apt needs root).
CHROMIUM := $(firstword $(wildcard /usr/bin/chromium /usr/bin/chromium-browser))

chromium:
ifeq ($(CHROMIUM),)
	@if [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else echo "chromium is missing and apt needs root: the browser test will be skipped"; fi
endif

test: $(VENV)/.test chromium
	KERAS_BACKEND=torch $(PY) -m pytest

$(VENV)/.bench: pyproject.toml | $(PY)
	$(PIP) -e '.[bench]'
	@touch $@ $(VENV)/.base

# Speed and accuracy measurements (markdown tables; about 6 hours on 2 CPU cores, most of it defaults.py).
bench: $(VENV)/.bench
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/data_loader.py
	$(PY) benchmarks/inference_cpu.py
	$(PY) benchmarks/defaults.py
	$(PY) benchmarks/compress_fashion_mnist.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/serve_attacks.py
	$(PY) benchmarks/ensemble_fashion_mnist.py
	$(PY) benchmarks/ddp_cpu.py
	$(PY) benchmarks/tune_fashion_mnist.py
	$(PY) benchmarks/detect_trees.py
	$(PY) benchmarks/segment_nuclei.py
	$(PY) benchmarks/segment_deploy.py
	$(PY) benchmarks/detect_deploy.py
	$(PY) benchmarks/monitor.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info .pytest_cache
