# d2v: `make demo` and `make test` work on a fresh CPU machine with Python 3.11.
# torch is installed first, pinned to the CPU build, so that nothing pulls a CUDA torch.
# Every package comes at the version in constraints.txt, the versions the suite passed with;
# `make lock` moves them to the newest releases (README "Tests").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LOCK ?= constraints.txt
TORCH ?= $(shell grep -E '^torch==' $(LOCK))
TRITON ?= $(shell grep -E '^triton==' $(LOCK))
EXTRAS ?= test,triton,demo,bench,hf
MODALITY ?= audio
# e.g. PRESET=image_tiny_v2 MODALITY=image for the data2vec 2.0 demo
PRESET ?= $(MODALITY)_tiny
DEMO_DATA ?= demo_data
DEMO_STEPS ?= 300
PYTEST_ARGS ?=
# Another pretraining seed of the demo (runs/demo-<modality>-seed<N>); empty: the preset's seed (1).
DEMO_SEED ?=
# Where the demo's run directory goes (make eval keeps its own pretraining runs apart).
DEMO_RUNS ?= runs
# The rendezvous port of the 2 local ranks: set another one to run two demos at once.
MASTER_PORT ?= 29500

.PHONY: venv test demo demo-data clean-venv wheels gpu-check lock

# Installs into VENV at the versions in CONSTRAINTS (empty: the newest releases setup.py allows).
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q $(2) --upgrade pip setuptools
	$(1)/bin/python -m pip install -q $(2) $(3)
	# deepspeed is an sdist whose setup imports torch: build it against the torch above.
	DS_BUILD_OPS=0 $(1)/bin/python -m pip install -q --no-build-isolation $(2) $(4) -e ".[$(EXTRAS)]"
	$(1)/bin/python -c "import torch, deepspeed; assert '+cpu' in torch.__version__ or torch.cuda.is_available(), torch.__version__"
endef

$(VENV)/.installed: setup.py $(LOCK)
	$(call install,$(VENV),-c $(LOCK),$(TORCH),$(TRITON))
	touch $@

venv: $(VENV)/.installed

test: venv
	DS_ACCELERATOR=cpu $(PY) -m pytest -q $(PYTEST_ARGS) tests

# The demo data is built once per modality: synthesized speech (eSpeak NG), the digits and
# photographs scikit-learn ships, or Python's own documentation.
$(DEMO_DATA)/%/patterns.json: | venv
	$(PY) -m d2v.data.demo $* $(DEMO_DATA)/$*

demo-data: $(DEMO_DATA)/$(MODALITY)/patterns.json

demo: venv demo-data
	DS_ACCELERATOR=cpu $(VENV)/bin/deepspeed --num_gpus 2 --master_port $(MASTER_PORT) launchers/pretrain.py \
		--ds_config ds_configs/cpu.json --preset $(PRESET) \
		--data "$$($(PY) -c 'import json,sys; print(json.load(open(sys.argv[1]))["train"])' $(DEMO_DATA)/$(MODALITY)/patterns.json)" \
		--val-data "$$($(PY) -c 'import json,sys; print(json.load(open(sys.argv[1]))["valid"])' $(DEMO_DATA)/$(MODALITY)/patterns.json)" \
		--out $(DEMO_RUNS)/demo-$(PRESET:_tiny=)$(if $(DEMO_SEED),-seed$(DEMO_SEED)) --resume auto \
		train.max_steps=$(DEMO_STEPS) train.val_every=100 train.log_every=25 $(if $(DEMO_SEED),train.seed=$(DEMO_SEED))

clean-venv:
	rm -rf $(VENV)

# Refreshes constraints.txt: a scratch venv takes the newest releases that setup.py allows (torch
# and triton stay at the versions named here: a newer torch has no CPU build on PyPI's default
# index), and its exact versions become the lock. Then `make test` installs them; commit the file
# once the suite passes.
LOCK_VENV ?= .venv-lock
LOCK_TORCH ?= $(TORCH)
LOCK_TRITON ?= $(TRITON)
lock:
	rm -rf $(LOCK_VENV)
	$(call install,$(LOCK_VENV),,$(LOCK_TORCH),$(LOCK_TRITON))
	{ echo "# d2v's tested environment (make lock; Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version(), platform.machine())'), CPU torch)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]*)\+cpu$$/\1/' | grep -vE '^(d2v|nvidia-[a-z0-9-]+)==|^-e '; \
	} > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "wrote $(LOCK); run make test before committing it"

# Pretrained versus random-init evaluation of the three demos over seeds (not part of CI).
# Pretrains EVAL_RUNS/demo-<modality> (seed 1) and EVAL_RUNS/demo-<modality>-seed<N> for the other
# EVAL_PRETRAIN_SEEDS, EVAL_DEMO_STEPS updates each, where they have no checkpoint yet: its own
# runs, so that a shorter `make demo` run is never mixed in (the evaluation refuses runs of one
# modality trained for different numbers of updates).
.PHONY: eval
EVAL_ARGS ?=
EVAL_PRETRAIN_SEEDS ?= 1 2 3
EVAL_DEMO_STEPS ?= 1000
EVAL_RUNS ?= runs/eval-pretrain
# The modalities to pretrain: those of the tasks in EVAL_ARGS --tasks (asr: audio, image_cls: image,
# text_cls and glue: text).
EVAL_MODALITIES ?= audio image text
eval: venv
	@for m in $(EVAL_MODALITIES); do for s in $(EVAL_PRETRAIN_SEEDS); do \
		if [ $$s = 1 ]; then run=$(EVAL_RUNS)/demo-$$m; seed=; else run=$(EVAL_RUNS)/demo-$$m-seed$$s; seed=$$s; fi; \
		test -e $$run/checkpoints/latest || $(MAKE) demo MODALITY=$$m PRESET=$${m}_tiny DEMO_SEED=$$seed \
			DEMO_RUNS=$(EVAL_RUNS) DEMO_STEPS=$(EVAL_DEMO_STEPS) || exit 1; \
	done; done
	DS_ACCELERATOR=cpu $(PY) -m d2v.finetune.evaluate --data $(DEMO_DATA) --runs $(EVAL_RUNS) --out runs/eval $(EVAL_ARGS)

# GPU acceptance (README "GPU acceptance"). On the GPU machine, with the Python that has its CUDA
# torch and Triton: `make gpu-check`, or `make gpu-check WHEELS=/path/to/wheels` to install d2v's
# dependencies first from a folder built by `make wheels` (no package registry needed; torch,
# triton and nvidia-* are never in the folder, so the machine's own builds stay).
GPU_PYTHON ?= python3
WHEELS ?=
GPU_CHECK_BUDGET ?= 480
GPU_CHECK_ARGS ?= --device cuda
gpu-check:
ifneq ($(WHEELS),)
	$(GPU_PYTHON) -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
	$(GPU_PYTHON) -m pip install --no-index --find-links $(WHEELS) d2v deepspeed pytest
endif
	timeout --kill-after=30 $$(( $(GPU_CHECK_BUDGET) + 120 )) $(GPU_PYTHON) benchmarks/gpu_check.py \
		--budget-s $(GPU_CHECK_BUDGET) $(GPU_CHECK_ARGS)

# The wheel folder for a GPU machine without a registry, built here: DeepSpeed (an sdist whose
# setup imports torch) as a wheel with no ops compiled (they are JIT-built on first use; d2v's
# default path needs none), d2v itself, and every other package of this venv at its version.
# WHEEL_PYTHON=3.12 fetches binary wheels for another Python instead of this venv's.
WHEEL_DIR ?= wheels
WHEEL_PYTHON ?=
wheels: venv
	mkdir -p $(WHEEL_DIR)
	$(PIP) freeze --all --exclude-editable | grep -viE '^(pip|torch|triton|deepspeed|nvidia-[a-z0-9-]+)==|^-e | @ ' \
		> $(WHEEL_DIR)/requirements.txt
	DS_BUILD_OPS=0 $(PIP) wheel -q --no-deps --no-build-isolation -w $(WHEEL_DIR) \
		"deepspeed==$$($(PY) -c 'from importlib.metadata import version; print(version("deepspeed"))')"
	$(PIP) wheel -q --no-deps --no-build-isolation -w $(WHEEL_DIR) .
ifeq ($(WHEEL_PYTHON),)
	$(PIP) wheel -q --no-deps -w $(WHEEL_DIR) -r $(WHEEL_DIR)/requirements.txt
else
	$(PIP) download -q --no-deps --only-binary=:all: --python-version $(WHEEL_PYTHON) \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(WHEEL_DIR) -r $(WHEEL_DIR)/requirements.txt
endif
	@ls $(WHEEL_DIR)/*.whl | wc -l | xargs echo "wheels in $(WHEEL_DIR):"
