# The two set-up commands of the README. TORCH picks the torch build: the default is the
# CPU build used here; on a CUDA machine install PyTorch's CUDA build first and pass TORCH=.
TORCH ?= torch==2.13.0
PYTHON ?= python
OUT ?= out/reference

.PHONY: install install-dev demo test

install:
	$(if $(TORCH),$(PYTHON) -m pip install $(TORCH))
	$(PYTHON) -m pip install -e '.[export,openvino]'

install-dev:
	$(if $(TORCH),$(PYTHON) -m pip install $(TORCH))
	$(PYTHON) -m pip install -e '.[dev]'

demo: install
	gptkiln export reference -o $(OUT) --force

test: install-dev
	$(PYTHON) -m pytest
