# Every target does its own setup on a fresh machine: a venv in .venv with the CPU torch wheel,
# the pinned tools, and lowbit built in place (CPU module, CUDA module when nvcc is present, and
# the test-only CUDA sim).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
BUILD_STAMP := $(VENV)/.lowbit-built
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: setup build test test-slow test-triton-newest demo bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements-ci.txt
	touch $@

build: setup $(BUILD_STAMP)

$(BUILD_STAMP): $(SOURCES)
	LOWBIT_SIM=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# The suite: reference, CPU, CUDA-through-the-sim and Triton-through-the-interpreter backends.
test: build
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -q tests

# The Triton kernels must also keep working on the newest triton (GPU users of torch 2.13 get
# 3.7.1, the pin above): a second venv runs the Triton tests and the AOT compile test there.
TRITON_NEWEST ?= 3.9.0
NEWEST_VENV := .venv-triton-newest
NEWEST_PY := $(NEWEST_VENV)/bin/python

test-triton-newest:
	$(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_PY) -m pip install -q -U pip
	$(NEWEST_PY) -m pip install -q $(TORCH)
	$(NEWEST_PY) -m pip install -q triton==$(TRITON_NEWEST) setuptools pybind11 numpy scipy \
		pytest pytest-xdist pytest-benchmark pytorch-optimizer==4.1.0
	LOWBIT_SIM=1 $(NEWEST_PY) -m pip install -q --no-build-isolation --no-deps -e .
	TRITON_INTERPRET=1 $(NEWEST_PY) -m pytest -n 2 -q tests -k triton

test-slow: build
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -q -m slow tests

# The main job: the pretraining demo's default comparison (a small LLaMA-style decoder trained
# byte-level on the Python standard library's sources with torch AdamW and lowbit's 32/8/4-bit,
# Stable-SPAM and Sophia optimizers, fp32 and bf16; about 5 minutes on 2 cores). Outputs and
# plots in DEMO_OUT.
DEMO_OUT ?= pretrain_out
demo: build
	$(PY) -m lowbit.examples.pretrain --out $(DEMO_OUT)
	@echo "plots: $(DEMO_OUT)/loss_curves.png $(DEMO_OUT)/memory.png; table: $(DEMO_OUT)/summary.md"

# The microbenchmark suite: every op family against the peers installed, one report with charts
# in bench/out. The peers are the [bench] extra of pyproject.toml (listed here too: installing
# the extra itself would rebuild lowbit); torch is already in, and none of them pins another.
BENCH_PEERS ?= bitsandbytes torchao pytorch-optimizer==4.1.0 sophia-opt==0.2.2 pyhessian==0.1 \
	"torch-optimi; python_version >= '3.10'" matplotlib pytest-benchmark numpy

bench: build
	$(PY) -m pip install -q $(BENCH_PEERS)
	$(PY) bench/run.py --torchao

clean:
	rm -rf build $(VENV) $(NEWEST_VENV) python/lowbit/*.so *.egg-info
