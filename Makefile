# Two entry points, each sets itself up on a fresh machine:
#   make demo   - the main job (a short QAT run on an embedded synthetic task)
#   make test   - the test suite
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m jaxcomp.demo

test: $(STAMP)
	$(VPY) -m pytest -q -n 2 tests

bench: $(STAMP)
	$(VPY) bench/qat_step.py

clean:
	rm -rf $(VENV)
