# Two entry points for a fresh clone (README): `make run` and `make test`.
PYTHON ?= python3
CORES ?= 2

.PHONY: install run test
install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test]"

run: install
	snakemake --cores $(CORES)

test: install
	$(PYTHON) -m pytest -q
