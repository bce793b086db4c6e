# Two entry points for a fresh clone (README): `make run` and `make test`; also `make test-fast`
# (the unit tests, without the end-to-end workflow runs marked slow) and `make lint` (.ci/run).
PYTHON ?= python3
CORES ?= 2

.PHONY: install run test test-fast lint slurm
install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test]"

run: install
	snakemake --cores $(CORES)

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

lint: install
	$(PYTHON) -m ruff check pkg tests benchmarks workflow
	snakemake --lint

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

# Every CUDA path (simulate, EMC dense and sparse, M-TIP, selfsup, phasing) against the CPU on a
# tiny case, with timings; exits 1 on a mismatch, 0 with "skipped" where there is no CUDA.
.PHONY: gpu-check
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
