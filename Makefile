# Two commands on a fresh Linux or macOS machine: `make serve` and `make test`.
VENV ?= .venv
PYTHON ?= python3
ARGS ?=

.PHONY: serve test install install-test lint bench clean

serve: $(VENV)/.installed
	$(VENV)/bin/dtype-serve $(ARGS)

# the tests run on the allocator the server runs on (tcmalloc where installed: models/platform/allocator.py)
test: $(VENV)/.installed-test
	$(VENV)/bin/python -m models.platform.allocator $(VENV)/bin/python -m pytest -q $(ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) PYTHON=$(PYTHON) sh scripts/install.sh
	touch $@

$(VENV)/.installed-test: pyproject.toml scripts/install.sh
	VENV=$(VENV) PYTHON=$(PYTHON) EXTRAS=test sh scripts/install.sh
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV)
