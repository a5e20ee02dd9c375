# Two commands for a fresh machine:  make demo   (set up + full pipeline on the synthetic dataset)
#                                    make test   (set up + test suite)
# Exact versions CI tested: make setup-locked (or LOCKED=1 with any target); regenerate them with make lock.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
LOCK := requirements-lock.txt
LOCKED ?= 0
# Kept out of the lock: a second cv2 provider, and packages the project never imports.
LOCK_EXCLUDE := opencv-python|hdbscan|supervision

.PHONY: setup setup-dev setup-locked lock demo test data speed clean-outputs

setup: $(STAMP)
setup-dev: $(DEV_STAMP)
setup-locked:
	$(MAKE) setup-dev LOCKED=1

# zip(strict=True) and other 3.10 features: refuse older interpreters before creating the venv.
# groundingdino-py compiles against torch, so torch goes first and the rest without build isolation;
# groundingdino-py itself goes without its declared dependencies (see requirements-nodeps.txt).
$(STAMP): requirements.txt requirements-nodeps.txt $(if $(filter 1,$(LOCKED)),$(LOCK))
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	  echo "error: Python >= 3.10 is required, but $(PYTHON) is $$($(PYTHON) -V 2>&1 || echo missing);" \
	       "install Python 3.10+ and run e.g. make $(MAKECMDGOALS) PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
ifeq ($(LOCKED),1)
	grep -v -E '^groundingdino-py==' $(LOCK) > $(VENV)/lock-base.txt
	$(PIP) install -q --no-deps -r $(VENV)/lock-base.txt
	$(PIP) install -q --no-deps --no-build-isolation $$(grep -E '^groundingdino-py==' $(LOCK))
else
	$(PIP) install -q $$(grep -E '^torch(vision)?[<>=]' requirements.txt | cut -d'#' -f1)
	$(PIP) install -q --no-build-isolation -r requirements.txt
	$(PIP) install -q --no-deps --no-build-isolation -r requirements-nodeps.txt
endif
	$(PY) -c 'import cv2, groundingdino, torch; assert tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 6)'
	touch $@

# The lock already holds the test packages.
$(DEV_STAMP): $(STAMP) requirements-dev.txt
ifneq ($(LOCKED),1)
	$(PIP) install -q -r requirements-dev.txt
endif
	touch $@

# The exact versions of the environment the tests passed in (run after make test).
lock: $(DEV_STAMP)
	{ echo "# Exact versions CI tested ($$($(PY) -V), $$(uname -s) $$(uname -m)); regenerate with: make lock"; \
	  echo "# Install with: make setup-locked (everything with --no-deps, groundingdino-py last)"; \
	  $(PIP) freeze --exclude-editable | grep -v -i -E '^($(LOCK_EXCLUDE))=='; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

data: setup
	$(PY) -m dataset_readers.synthetic_loco

demo: setup
	$(PY) run_demo.py

test: $(DEV_STAMP)
	$(PY) -m pytest -q tests

speed: setup
	$(PY) benchmark_speed.py

clean-outputs:
	rm -rf anomaly_score/*_score.* anomaly_score/anomaly_maps results
