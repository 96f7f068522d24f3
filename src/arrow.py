"""Arrow routing (Ostapenko et al., 2024): the adapters gated per token and layer without training, from each
adapter's top right singular vector, in the same gated LoRA layer as MoA (src/lora.py's LoraLinear reads
`layer.arrow`)."""
import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import BadInput
from .lora import lora_layers
from .lowrank import truncated_svd


@dataclass(frozen=True)
class Arrow:
    """Arrow routing (Ostapenko et al., 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs"),
    training-free. In each layer adapter i's prototype v_i is the top right singular vector of its update B_i A_i
    (unit norm; its sign does not matter): a token with input x scores every adapter by |x . v_i|, keeps the top_k,
    and mixes those with softmax(score / temperature) (the others get 0):

        y = W x + sum_i g_i(x) s_i B_i A_i x,   g(x) = softmax_topk(|V x| / temperature)

    The same rule as PEFT's ArrowLoraLinearLayer (scores from the input as the layer receives it, not normalised),
    but exact prototypes (`arrow_prototypes`) where PEFT runs 15 power iterations from a random start (the same
    vector, up to sign, when the top singular value stands clear of the second), and any ranks."""
    prototypes: torch.Tensor   # (N, d_in)
    top_k: int
    temperature: float

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """(..., N) gates for inputs x (..., d_in)."""
        scores = (x.to(self.prototypes.dtype) @ self.prototypes.T).abs()
        top, index = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1)
        return torch.softmax(torch.full_like(scores, float("-inf")).scatter(-1, index, top) / self.temperature, -1)


def arrow_prototypes(A: list, B: list) -> torch.Tensor:
    """(N, d_in) in float64: the top right singular vector v_1 of each B_i A_i (`lowrank.truncated_svd` at rank 1,
    without forming it)."""
    return torch.stack([truncated_svd(b.detach(), a.detach(), 1)[2][0] for a, b in zip(A, B)])


def model_prototypes(model: nn.Module) -> list:
    """Every LoRA layer's Arrow prototypes (`arrow_prototypes`, in the layer's factor dtype), in lora_layers order."""
    return [arrow_prototypes(layer.A, layer.B).to(layer.factor_dtype) for layer in lora_layers(model).values()]


@contextlib.contextmanager
def arrow_routing(model: nn.Module, top_k: int, temperature: float, prototypes: list | None = None):
    """Within the block every LoRA layer gates its adapters per token by Arrow (`Arrow`), with `prototypes` (from
    `model_prototypes`; computed from the adapters the layers hold now when None). Inside `routing(model)` each
    layer also records its top choice at the prompt's last position (`route_decisions`), for the routing report."""
    layers = list(lora_layers(model).values())
    if not layers or any(len(layer.A) == 0 for layer in layers):
        raise BadInput("Arrow routes between adapters: inject(model, targets) and add_adapter them first")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise BadInput(f"Arrow top_k={top_k!r}: give a whole number >= 1")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise BadInput(f"Arrow temperature={temperature!r}: give a number > 0")
    prototypes = prototypes or model_prototypes(model)
    if [tuple(v.shape) for v in prototypes] != [(len(layer.A), layer.base.in_features) for layer in layers]:
        raise BadInput("Arrow prototypes of another model or other adapters: compute them with model_prototypes(model)")
    for layer, v in zip(layers, prototypes):
        layer.arrow = Arrow(v, top_k, float(temperature))
    try:
        yield
    finally:
        for layer in layers:
            layer.arrow = None
