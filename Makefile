# paranet — every target installs into a local virtual environment (.venv) first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
NP     ?= 4
# BLAS threads per rank: paranet decides them from the CPUs each rank may use (paranet/threads.py);
# set OMP_NUM_THREADS (or --threads) to choose yourself.

.PHONY: venv test train data bench accuracy clean
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

## make test: the whole test suite (real mpirun, real HDF5, real MNIST)
test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

## make data: convert the embedded MNIST into datasets/mnist.h5
data: venv
	$(PY) -m paranet.data mnist --out datasets/mnist.h5

## make train: 4-rank data-parallel MNIST training on the embedded data
train: venv
	$(VENV)/bin/mpirun -n $(NP) $(PY) -m paranet.train $(ARGS)

## make bench: benchmarks (ratios measured side by side), results in bench/results/; the README's
## tables are then rewritten from bench/results/bench.json (python -m bench.readme_tables)
bench: venv
	$(PY) -m bench $(ARGS)
	$(PY) -m bench.readme_tables

## make accuracy: train both models with their defaults and check the README's accuracies
accuracy: venv
	$(PY) bench/accuracy.py $(ARGS)

clean:
	rm -rf $(VENV) datasets/*.h5 bench/results
