# Set-up and run targets. Both create or reuse .venv and install from pyproject.toml.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# Simulated CPU devices so mesh tests run on one machine.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: test train install clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests

train: $(STAMP)
	$(VENV)/bin/python train.py

clean:
	rm -rf $(VENV) runs
