# vaepipe — every target works on a fresh clone: `make install` builds .venv/ with what the project needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# On a machine without an NVIDIA GPU torch is installed on its own first, pinned, so pip never pulls the CUDA
# build (several GB). Elsewhere point this at the CPU wheels, e.g. https://download.pytorch.org/whl/cpu.
TORCH_CPU_INDEX ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
# The demo: full-size random-weight Wan 2.1 VAE at 480p on a GPU, the tiny one on a CPU (same code path).
DEMO_VAE ?= $(if $(HAS_GPU),random:wan2.1,random:wan2.1-tiny)
DEMO_SIZE ?= $(if $(HAS_GPU),480x832x81,240x416x33)
CONFIG ?= configs/demo-cpu.toml

.DEFAULT_GOAL := help
.PHONY: help install demo test test-quick lint bench batch clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## Create .venv and install vaepipe with its test tools

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(HAS_GPU),yes)
	$(BIN)/python -m pip install -q torch
else
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_CPU_INDEX),--index-url $(TORCH_CPU_INDEX))
endif
	$(BIN)/python -m pip install -q -e '.[test,plot,naive,natural]'
ifeq ($(HAS_GPU),yes)
	# The engine's Triton kernels compiled and cuDNN's tuning choice recorded now, not in the first decode.
	$(BIN)/vaepipe warmup || echo "vaepipe warmup failed: decodes still work, their first calls pay the set-up"
endif
	touch $@

demo: install ## Decode synthetic latents with a random-weight VAE into demo/demo.mp4
	$(BIN)/vaepipe make-latents demo/latents.pt --size $(DEMO_SIZE)
	$(BIN)/vaepipe decode demo/latents.pt demo/demo.mp4 --vae $(DEMO_VAE)
	@echo "demo/demo.mp4 is written. vaepipe is installed in $(VENV)/, not on your PATH: run it as"
	@echo "  $(BIN)/vaepipe --help"
	@echo "or activate the environment first (source $(BIN)/activate), then: vaepipe --help"

test: install ## Run the whole test suite, as CI does (GPU tests skip without CUDA)
	$(BIN)/python -m pytest -q

test-quick: install ## The tests not marked slow: minutes less on a small CPU (README: what they leave out)
	$(BIN)/python -m pytest -q -m "not slow"

lint: install ## ruff on the package and the tests
	$(BIN)/ruff check vaepipe tests

bench: install ## Benchmark naive vs sync vs pipelined (GPU: full size; CPU: tiny) into bench/
	$(if $(HAS_GPU),$(BIN)/vaepipe bench --trace --plot --out bench,$(BIN)/vaepipe bench --device cpu --vae random:wan2.1-tiny --shape 48x80x17 --runs 3 --out bench)

# The example configs in configs/ write to ../demo, outside their folder: they alone get --allow-outside.
batch: install ## Run a batch config: make batch CONFIG=path (default: the demo config, which makes its inputs)
ifeq ($(CONFIG),configs/demo-cpu.toml)
	for i in 0 1 2 3; do [ -f demo/batch/latents/clip$$i.pt ] || \
	  $(BIN)/vaepipe make-latents demo/batch/latents/clip$$i.pt --size 48x80x17 --seed $$i; done
	[ -f demo/batch/hero.pt ] || $(BIN)/vaepipe make-latents demo/batch/hero.pt --size 64x96x17 --seed 9
endif
	$(BIN)/vaepipe batch $(CONFIG)$(if $(filter configs/%,$(CONFIG)), --allow-outside)

clean: ## Remove the virtual environment, demo and bench outputs, caches
	rm -rf $(VENV) demo bench .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
