# The two commands that matter: `make demo` and `make test`. Both install into .venv first if needed.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
PIPELINE ?= pipelines/shapes.yaml
# Offline by design: model hubs are unreachable here and real weights come from local files.
export HF_HUB_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# Prefect's ephemeral server gets 20 s to start by default; a busy 2-core machine can need more.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export NO_ALBUMENTATIONS_UPDATE := 1
export PREFECT_HOME ?= $(CURDIR)/runs/.prefect
# pip prints one warning per package for the machine's empty local index folders; hide only those lines.
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install install-dev demo serve stop test test-slow test-all lint clean

# `make demo` installs what running needs; the test targets add the dev extra (pytest, ruff, references).
install: $(STAMP)
install-dev: $(DEV_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip $(QUIET_PIP)
	$(BIN)/pip install -q -e . $(QUIET_PIP)
	# img2dataset without its declared deps: they include the `dataclasses` backport, whose
	# dataclasses.py shadows the stdlib in Prefect's ephemeral server. Its real deps are in pyproject.
	$(BIN)/pip install -q --no-deps 'img2dataset==1.47.0' $(QUIET_PIP)
	$(BIN)/pip uninstall -q -y dataclasses 2>/dev/null || true
	$(BIN)/python -c "import importlib.util as u, sys; s = u.find_spec('dataclasses'); \
	  sys.exit(0 if 'site-packages' not in s.origin else 'dataclasses backport is installed: ' + s.origin)"
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev]' $(QUIET_PIP)
	$(BIN)/pip uninstall -q -y dataclasses 2>/dev/null || true
	touch $(DEV_STAMP)

demo: install
	$(BIN)/clipgen run $(PIPELINE)

# A real Prefect server on 127.0.0.1:4200 with a process work pool, every deployment of prefect.yaml and a
# worker; `make stop` ends exactly those processes (PIDs in runs/.serve). See scripts/serve.sh.
serve: install
	BIN=$(BIN) scripts/serve.sh start

stop:
	BIN=$(BIN) scripts/serve.sh stop

# pytest exits 5 when it collected no tests: that is a failure here, never a silent pass. Tests that import
# Prefect in-process need PREFECT_HOME to exist (Prefect only warns, then keeps its state elsewhere).
PYTEST = mkdir -p "$(PREFECT_HOME)"; $(BIN)/python -m pytest -q $(1) || { rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests" >&2; exit $$rc; }

test: install-dev lint
	$(call PYTEST,-m "not slow")

test-slow: install-dev
	$(call PYTEST,-m slow)

test-all: install-dev lint
	$(call PYTEST,)

lint: install-dev
	$(BIN)/ruff check clipgen flows tests benchmarks

clean:
	rm -rf $(VENV) runs
