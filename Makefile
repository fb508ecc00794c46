# Two entry points, each sets itself up on a fresh machine:
#   make demo   - the main job: Fashion-MNIST QAT (w4a8 + LSQ CNN) through the CLI
#   make test   - the test suite
# Also: make data (Fashion-MNIST from Debian's dataset-fashion-mnist into $(DATA_DIR)),
#       make bench (QAT step times vs Qwix), make synthetic (the no-data QAT demo).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-core
TSTAMP  := $(VENV)/.installed-test
BSTAMP  := $(VENV)/.installed-bench
# The CUDA plugin of the installed jax, for jaxcomp.aot's GPU targets only: its own directory
# (PYTHONPATH of the processes that compile for GPUs), as loaded into every jax process it
# would print CUDA driver warnings. No CUDA libraries: XLA:GPU runs the ptxas on PATH.
GPU_PLUGIN := $(VENV)/aot-gpu

DATA_DIR ?= $(or $(TFDS_DATA_DIR),$(HOME)/tensorflow_datasets)
FMNIST_SRC := /usr/share/datasets/fashion-mnist
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test bench data synthetic clean aot-gpu

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e .
	touch $(STAMP)

$(TSTAMP): $(STAMP)
	$(VPY) -m pip install -q -e ".[test,aot]"
	touch $(TSTAMP)

$(GPU_PLUGIN)/.installed: $(STAMP)
	v=$$($(VPY) -c "import jax; print(jax.__version__)") && \
	  $(VPY) -m pip install -q --no-deps --target $(GPU_PLUGIN) \
	    "jax-cuda12-plugin==$$v" "jax-cuda12-pjrt==$$v"
	touch $@

aot-gpu: $(GPU_PLUGIN)/.installed

$(BSTAMP): $(STAMP)
	$(VPY) -m pip install -q -e ".[bench]"
	touch $(BSTAMP)

data: $(STAMP)
	test -f $(FMNIST_SRC)/train-images-idx3-ubyte.gz || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)
	$(VPY) -m jaxcomp.data.fashion_mnist --data_dir $(DATA_DIR)

demo: data
	$(VPY) -m jaxcomp --config configs/fmnist_qat.py:w4a8_lsq --workdir runs/fmnist/w4a8_lsq \
	  --config.data.data_dir=$(DATA_DIR)

synthetic: $(STAMP)
	$(VPY) -m jaxcomp.demo

test: $(TSTAMP) $(GPU_PLUGIN)/.installed
	$(VPY) -m pytest -q -n 2 --dist worksteal tests

bench: $(BSTAMP)
	$(VPY) bench/qat_step.py

clean:
	rm -rf $(VENV)
