# Two commands matter: `make serve` and `make test`. Both set everything up first.
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup serve test test-fast chat bench clean

setup:
	@bash scripts/setup.sh

serve: setup
	$(VENV)/bin/idletune serve --host $(HOST) --port $(PORT) $(ARGS)

chat: setup
	$(VENV)/bin/idletune chat $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest --durations=15 $(PYTEST_ARGS)

test-fast: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
