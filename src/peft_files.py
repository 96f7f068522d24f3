"""Adapters on disk in PEFT's format (adapter_config.json + adapter_model.safetensors): ours load in PEFT and
PEFT's in ours, with per-module ranks and alphas (rank_pattern / alpha_pattern) and rsLoRA's scale."""
import json
import math
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import BadInput, MissingFile
from .files import atomic_write
from .lora import Adapter, Lora

PEFT_PREFIX = "base_model.model."


def save_adapter(adapter: Adapter, folder, targets=None):
    """PEFT's format: keys `base_model.model.<module>.lora_{A,B}.weight`; per-module ranks and alphas go to
    rank_pattern / alpha_pattern where they differ from the most common one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ranks = adapter.ranks()
    alphas = {n: lora.scale * ranks[n] for n, lora in adapter.modules.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": adapter.base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(targets or {n.rpartition(".")[2] for n in adapter.modules}),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "inference_mode": True,
    }
    tensors = {}
    for name, lora in adapter.modules.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora.A.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora.B.contiguous()
    atomic_write(folder / "adapter_model.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write(folder / "adapter_config.json", lambda p: p.write_text(json.dumps(config, indent=2)))


def _pattern_value(pattern: dict, name: str, default):
    # PEFT matches pattern keys as a suffix of the module path
    for key, value in pattern.items():
        if name == key or name.endswith("." + key):
            return value
    return default


def load_adapter(folder, hint: str = "") -> Adapter:
    """A PEFT LoRA adapter folder (ours or one trained with PEFT); `hint` says how to create a missing one."""
    folder = Path(folder)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for p in (config_path, weights_path):
        if not p.exists():
            raise MissingFile(f"missing adapter file {p}" + (f": create it with `{hint}`" if hint else ""))
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(str(weights_path))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise BadInput(f"corrupt adapter in {folder} ({str(e).splitlines()[0]}): delete the folder and "
                       f"{'run `' + hint + '`' if hint else 'save it again'}") from e
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise BadInput(f"{config_path}: only plain LoRA adapters are supported (peft_type LORA, use_dora false)")
    modules = {}
    for key in tensors:
        if not (key.startswith(PEFT_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight"))):
            raise BadInput(f"{weights_path}: unexpected tensor {key!r} (only lora_A / lora_B weights are supported)")
        name = key[len(PEFT_PREFIX):].rsplit(".", 2)[0]
        if name in modules:
            continue
        A, B = tensors.get(f"{PEFT_PREFIX}{name}.lora_A.weight"), tensors.get(f"{PEFT_PREFIX}{name}.lora_B.weight")
        if A is None or B is None:
            raise BadInput(f"{weights_path}: module {name} has only one of lora_A / lora_B")
        r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        if A.shape[0] != r:
            raise BadInput(f"{weights_path}: module {name} has rank {A.shape[0]}, the config says {r}")
        modules[name] = Lora(A, B, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
    if not modules:
        raise BadInput(f"{weights_path} holds no LoRA weights")
    return Adapter(modules, config.get("base_model_name_or_path", ""))
