# d2v: `make test` and `make demo` work on a fresh CPU machine with Python 3.11.
# torch is installed first, pinned to the CPU build, so that nothing pulls a CUDA torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH ?= torch==2.13.0
TRITON ?= triton==3.9.0
EXTRAS ?= test,triton,demo
MODALITY ?= audio
PYTEST_ARGS ?=

.PHONY: venv test demo clean-venv

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	# deepspeed is an sdist whose setup imports torch: build it against the torch above.
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation $(TRITON) -e ".[$(EXTRAS)]"
	$(PY) -c "import torch, deepspeed; assert '+cpu' in torch.__version__ or torch.cuda.is_available(), torch.__version__"
	touch $@

venv: $(VENV)/.installed

test: venv
	DS_ACCELERATOR=cpu $(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: venv
	DS_ACCELERATOR=cpu $(PY) launchers/pretrain.py --preset $(MODALITY)_tiny --ds_config ds_configs/cpu.json \
		--out runs/demo-$(MODALITY)

clean-venv:
	rm -rf $(VENV)
