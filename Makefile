# vanishlab: `make train`, `make test`. Everything runs in .venv, made on first use.
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: train test bench tensorboard lint report docs clean

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,docs,wandb,mlflow]'
	touch $@

train: $(VENV)/.installed  ## the reference experiment (add ARGS="model.depth=8 ...")
	$(PY) -m vanishlab.train $(ARGS)

# Tests run on every CPU (pytest-xdist), each file's tests in one worker: a file's tests share
# its fixtures, and the SLURM ones take turns on the one-node cluster. ARGS="-n0": one process.
test: $(VENV)/.installed  ## all tests; the real-MNIST ones run when DATA_DIR has MNIST
	$(PY) -m pytest -n auto --dist loadfile $(ARGS)

bench: $(VENV)/.installed  ## speed ratios against baselines measured in the same run
	$(PY) bench/run.py $(ARGS)

report: $(VENV)/.installed  ## report on the newest sweep (or ARGS=<sweep dir>)
	$(PY) -m vanishlab.report $(ARGS)

tensorboard: $(VENV)/.installed  ## serve outputs/ on http://127.0.0.1:6006
	$(VENV)/bin/tensorboard --logdir outputs --host 127.0.0.1 --port 6006

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

docs: $(VENV)/.installed  ## the documentation site (mkdocs.yml, docs/) into site/; fails on any warning
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:  ## remove the environment and caches (runs under outputs/ are kept)
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info build dist site
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
