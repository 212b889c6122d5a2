# The README's commands. PYTHON may point at another interpreter.
PYTHON ?= python3
# MNIST IDX files: the workspace copy when present, else ./data/mnist.
MNIST_DIR ?= $(if $(wildcard ../shared/mnist),../shared/mnist,data/mnist)

.PHONY: install test train demo bench cuda-check gpu-check clean

install:
	$(PYTHON) -m pip install "torch==2.13.0" pytest hypothesis numpy tqdm matplotlib
	$(PYTHON) -m pip install -e . --no-build-isolation --no-deps

test: install
	$(PYTHON) -m pytest tests -q

train: install
	$(PYTHON) examples/train_mnist.py --data-dir $(MNIST_DIR) --epochs 3 --out runs/mnist

demo: install
	$(PYTHON) examples/demo.py

bench:
	$(PYTHON) -m benchmarks.run --device cpu

cuda-check:
	bash scripts/cuda_check.sh

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build torchpool/_C*.so *.egg-info
