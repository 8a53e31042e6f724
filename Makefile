# Two commands for everything: `make main` (install, then run the embedded default) and
# `make test` (install, then run the test suite). Both are idempotent: the install step runs only
# when pyproject.toml or constraints.txt changed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: install data main test

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[all]'
	touch $(STAMP)

# Fashion-MNIST ships as a Debian package (the offline CLIP suite's images).
data:
	@test -d $(FASHION_MNIST) || $(SUDO) apt-get install -y -q dataset-fashion-mnist \
		|| ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)

install: $(STAMP) data

main: install
	$(PY) -m epmq demo

test: install
	$(PY) -m pytest -n 2 -q
