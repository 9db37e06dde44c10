# Two commands do all set-up on a fresh machine (Python >= 3.10 with venv, no GPU needed):
#   make demo   installs into .venv, then runs the main job on the CPU
#   make test   installs into .venv, then runs the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgessm-installed

.PHONY: setup demo test gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-ci.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-ci.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -n 2 -q -ra tests

# On a machine with an NVIDIA GPU (the device tool runs this on an H100):
gpu-check:
	bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) build plugins/build out
