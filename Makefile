# `make demo` and `make test` each build .venv on a fresh machine, then run.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: demo demo-quick pretrained pretrained-eval test test-slow test-gpu install clean

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	# torch first, pinned: otherwise a dependency drags in a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The shipped tiny checkpoints (committed, float16; `make pretrained` rebuilds them, commands in
# their README.md) are what the demo compares when all three exist; it still trains every recipe
# live briefly. The five-task set is the default once it ships (its pretrained.json says how its
# demo runs); until then the butter set.
PRETRAINED ?= $(if $(word 4,$(wildcard pretrained/scene2-basket/pretrained.json) $(foreach r,vla ecot ecot-lite-dropout,$(wildcard pretrained/scene2-basket/$(r)/model.safetensors))),pretrained/scene2-basket,pretrained/tiny-libero-butter)
SHIPPED := $(foreach r,vla ecot ecot-lite-dropout,$(wildcard $(PRETRAINED)/$(r)/model.safetensors))

demo: $(STAMP)
	$(VENV)/bin/edge-vla demo $(if $(word 3,$(SHIPPED)),--pretrained $(PRETRAINED))

pretrained: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PRETRAINED)/make.sh

# The shipped set's own evaluation, where it has one (pretrained/scene2-basket/evaluate.sh).
pretrained-eval: $(STAMP)
	@test -x $(PRETRAINED)/evaluate.sh || { echo "$(PRETRAINED) has no evaluate.sh (its evaluation is the demo's: make demo)"; exit 1; }
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PRETRAINED)/evaluate.sh

demo-quick: $(STAMP)
	$(VENV)/bin/edge-vla demo --quick

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) build *.egg-info
