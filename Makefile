# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both build .venv/ first (once; again when pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench gpu-bundle clean

# PYTHONWARNINGS: setuptools prints an information-only notice ("Editable installation ... be
# careful with folders ... with the same name as your package") for every editable install whose
# package folders are mapped (conf/ -> sdrun.conf); it asks nothing of us, so the install stays quiet.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: a stochastic-depth ResNet-20 on scikit-learn's
# digits, offline, about a minute on 2 CPU cores. Writes runs/<time>_digits_.../.
demo: $(STAMP)
	$(BIN)/sdrun train dataset=digits

# The layers' import contracts first (pyproject.toml [tool.importlinter], seconds), then
# one pytest worker per core (at most 4), whole test files per worker: a file's module-scoped
# runs are made once, and a subprocess-heavy file overlaps with an in-process one.
test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

# The speed figures (sdrun bench --help): SD saving, trainer overhead, eval, ResNet-1202.
bench: $(STAMP)
	$(BIN)/sdrun bench --out bench.json

# What the bare H200 machine lacks (wheels, a CIFAR-10 subset) into the ignored gpu_bundle/,
# for scripts/gpu_acceptance.sh there (docs/gpu/runbook.md). Needs PyPI and ../shared/data.
gpu-bundle: $(STAMP)
	PYTHON=$(BIN)/python scripts/gpu_bundle.sh

clean:
	rm -rf $(VENV) build dist *.egg-info
