# Two commands for a fresh machine:  make demo   (set up + full pipeline on the synthetic dataset)
#                                    make test   (set up + test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test data speed clean-outputs

setup: $(STAMP)

# groundingdino-py compiles against torch, so torch goes first and the rest without build isolation.
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q --no-build-isolation -r requirements.txt
	touch $(STAMP)

data: setup
	$(PY) -m dataset_readers.synthetic_loco

demo: setup
	$(PY) run_demo.py

test: setup
	$(PY) -m pytest -q tests

speed: setup
	$(PY) benchmark_speed.py

clean-outputs:
	rm -rf anomaly_score/*_score.* anomaly_score/anomaly_maps results
