# fashsim — the README's two commands are `make run` and `make test`.
# Both create/refresh .venv (installing with constraints.txt) and make sure Fashion-MNIST is present.
# A second call is a no-op for the install (stamp file) and the data check.

PYTHON  ?= python3
VENV    ?= .venv
EXTRAS  ?= cpu,notebooks,pretrained,app,milvus,dev
PORT    ?= 8866
# Tornado's websocket message limit for JupyterLab: uploads to the search app travel in one message
# (the same value as fashsim.app.webapp.WEBSOCKET_MAX_MESSAGE_BYTES; the web app sets its own).
WS_MAX  := 67108864
PROFILE ?= full
BIN     := $(VENV)/bin
comma   := ,
STAMP   := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: run test setup data bench lab serve strip constraints clean help

help:
	@echo "make run    - the whole notebook pipeline on Fashion-MNIST (profile=$(PROFILE)) -> data/, reports/"
	@echo "make test   - ruff (lint + format) and the test suite (unit tests + every notebook headless, smoke profile)"
	@echo "make bench  - benchmarks -> reports/benchmarks/*.json"
	@echo "make lab    - JupyterLab on notebooks/"
	@echo "make serve  - the search app as a web page (Voila) on http://127.0.0.1:$(PORT)/"
	@echo "make strip  - strip outputs from notebooks/*.ipynb before committing"

run: setup
	$(BIN)/python -m fashsim run --profile $(PROFILE)

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/run_all.py

lab: setup
	$(BIN)/jupyter lab notebooks/ --ServerApp.tornado_settings="{'websocket_max_message_size': $(WS_MAX)}" \
		$(if $(filter 0,$(shell id -u)),--allow-root)

serve: setup
	$(BIN)/python -m fashsim serve --port $(PORT)

setup: $(STAMP) data

# The virtual environment, refreshed whenever pyproject.toml or constraints.txt change, or when
# another EXTRAS was installed since (only the last install's stamp is kept).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# Fashion-MNIST: found already (explicit path, $$FASHSIM_DATA, data/raw, /usr/share/datasets)?
# Else on Debian as root: the Debian package. Else: try the official download, which fails
# with a message listing every way to provide the files.
data: $(STAMP)
	@if $(BIN)/python -m fashsim data --check >/dev/null 2>&1; then \
		echo "Fashion-MNIST: found ($$($(BIN)/python -m fashsim data --where))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
		$(BIN)/python -m fashsim data --check; \
	else \
		$(BIN)/python -m fashsim data --download; \
	fi
	@# Chromium for the browser tests (Playwright drives /usr/bin/chromium; it cannot download one here).
	@if command -v chromium >/dev/null 2>&1; then \
		echo "Chromium: found ($$(command -v chromium))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Chromium: installing the Debian package chromium"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "Chromium: not found; the browser tests will be skipped (install the chromium package)"; \
	fi

strip: $(STAMP)
	$(BIN)/nbstripout --keep-id notebooks/*.ipynb

constraints: $(STAMP)
	@echo "Review the diff: torch must stay 'torch==2.13.0,!=2.13.0+cpu'."
	$(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)$$/torch==\1,!=\1+cpu/' > constraints.freeze.txt

clean:
	rm -rf $(VENV) reports/executed
