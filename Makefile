# Set-up and run targets. Each creates or reuses .venv and installs the package with the exact dependency
# versions of requirements.lock (the set the suite last passed with); `make lock` is the one way to move them.
PYTHON ?= python3
VENV := .venv
LOCK := requirements.lock
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)
# Simulated CPU devices so mesh tests run on one machine.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: test lint train notebook install lock clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c $(LOCK) pip
	$(VENV)/bin/pip install -q -c $(LOCK) -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=15 tests

train: $(STAMP)
	$(VENV)/bin/python train.py

# Run notebooks/quickstart.ipynb headless on this venv's own kernel (its bin/ first on PATH); fails on any
# cell error. The suite runs it too (tests/test_notebook.py).
notebook: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/jupyter-execute --kernel_name=python3 --timeout=900 \
	  notebooks/quickstart.ipynb

# Resolve the newest versions pyproject.toml allows in a scratch environment, write them to the lock, then run
# the suite on them. Commit the new lock only if `make test` passed.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q -e '.[test]'
	{ echo "# Written by 'make lock' on $$(date -u +%F) with $$(.lock-venv/bin/python -V); do not edit."; \
	  echo "# torch's local tag (+cpu) is dropped so that the pin also matches the PyPI build."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | sed -e 's/+cpu$$//'; } > $(LOCK)
	rm -rf .lock-venv
	$(MAKE) test

clean:
	rm -rf $(VENV) .lock-venv runs
