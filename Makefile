# Two entry points, each sets itself up on a fresh machine:
#   make demo   - the main job (a short QAT run on an embedded synthetic task)
#   make test   - the test suite
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-core
TSTAMP  := $(VENV)/.installed-test
BSTAMP  := $(VENV)/.installed-bench

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e .
	touch $(STAMP)

$(TSTAMP): $(STAMP)
	$(VPY) -m pip install -q -e ".[test]"
	touch $(TSTAMP)

$(BSTAMP): $(STAMP)
	$(VPY) -m pip install -q -e ".[bench]"
	touch $(BSTAMP)

demo: $(STAMP)
	$(VPY) -m jaxcomp.demo

test: $(TSTAMP)
	$(VPY) -m pytest -q -n 2 tests

bench: $(BSTAMP)
	$(VPY) bench/qat_step.py

clean:
	rm -rf $(VENV)
