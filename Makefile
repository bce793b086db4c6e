# Two entry points for a fresh clone (README): `make run` and `make test`.
PYTHON ?= python3
CORES ?= 2

.PHONY: install run test slurm
install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test]"

run: install
	snakemake --cores $(CORES)

test: install
	$(PYTHON) -m pytest -q

# A single-node SLURM on this machine (root, Debian), for tests/test_slurm.py and
# `snakemake --profile profiles/slurm --profile profiles/slurm-local`.
slurm:
	bash workflow/slurm/start-local-slurm.sh

# Speed benchmarks, side by side with Dragonfly where it is installed (benchmarks/README.md):
#   make bench                       the default run (about 10 minutes on 2 cores)
#   make bench BENCH_ARGS=--quick    a one-minute smoke run; also --device cuda, --no-dragonfly
.PHONY: bench
bench: install
	$(PYTHON) benchmarks/run.py $(BENCH_ARGS)
