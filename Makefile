# The two jobs a newcomer runs: `make demo` and `make test`. Both set up .venv first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test clean browser

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# open_clip needs torchvision, whose PyPI wheels match the PyPI torch build: several GB
# with its CUDA libraries, which also run on a CPU-only machine.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/wsclip demo

# The review page's browser test drives a real headless Chromium (Debian's packages, driven by
# Selenium): installed here when missing and apt-get exists (as root, or through sudo). Without a
# browser that test fails, it does not skip.
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)
browser:
	@if (command -v chromium || command -v chromium-browser) >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "make: installing Chromium and chromedriver from the distribution's packages (the review page test)"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
		echo "make: no chromium/chromedriver and no apt-get: install them, or the review page's browser test fails" >&2; \
	fi

# pytest's exit 5 (no test collected) is a failure too; make turns any non-zero status into its own
test: $(STAMP) browser
	@rc=0; $(BIN)/python -m pytest -q $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
