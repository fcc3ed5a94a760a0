# One-command entry points. Each target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: install test test-paper test-slow lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,onnx,hf]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

# Fashion-MNIST (Debian package) is installed when missing so the end-to-end tests run, not skip.
test: $(STAMP) $(FMNIST)/train-images-idx3-ubyte.gz
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# The paper's networks at 224 px through every command-line tool (tests/test_paper_shapes.py): ~8 min on 2 cores.
test-paper: $(STAMP) $(FMNIST)/train-images-idx3-ubyte.gz
	$(PY) -m pytest -q -m paper tests/test_paper_shapes.py

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

$(FMNIST)/train-images-idx3-ubyte.gz:
	@if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; fi
	test -f $@

demo: $(STAMP) $(FMNIST)/train-images-idx3-ubyte.gz
	$(PY) train_dino.py --config configs/demo.yaml --output_dir runs/demo
	$(PY) utils/plot_log.py runs/demo

bench: $(STAMP)
	$(PY) benchmarks/knn.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
