"""LoRA layers, the Mixture-of-LoRAs router, and the paper's merges: the math of the original's `src/lora.py`.

What is here, top to bottom:

* `Lora(A, B, scale)`: one module's adapter factors, update `scale * B @ A`; `Adapter`: one per module of a model.
* `LoraLinear`: an `nn.Linear` with N adapters and a per-sample gate g (batch x N):
      y = W x + b + sum_i g[b, i] * s_i * B_i A_i dropout(x)
  One-hot g is a single-task LoRA, all ones is concatenation, the router's choice is MoA, no adapter is the base.
  Factors and routers are float32 even on a bf16/fp16 base (as PEFT's autocast_adapter_dtype): at lr 5e-5 an AdamW
  step is below half a bf16 rounding step for any entry above about 2^-6, so bf16 factors would not train. The LoRA
  branch runs in float32 and is added in the base layer's output dtype.
* `inject` / `remove`: wrap the target Linear modules of a Hugging Face causal LM, and put the originals back.
* `add_adapter`, `get_adapter`, `gated`: put an adapter into the layers, read one out, set the gate for a block.
* `fold` (add an adapter's update into W for good) and `folded` (for the duration of a block, then the original W
  bit for bit).
* The paper's three merges, per module: `concat` (sum_i s_i B_i A_i, rank R, exact), `weight_sum` (s (sum B_i)
  (sum A_i), the original's "weighted"), `svd_merge` (rank-8 truncated SVD of the mean update). The merges published
  since are in src/merges.py, and every method is listed in src/registry.py.
* MoA: `make_routers` / `attach_routers`, `routing` (route each sample once at the prompt, keep the choice while generating),
  `router_inputs` (features for training with teacher forcing), `router_loss`, `save_routers` / `load_routers`.

Elsewhere: PEFT's files (src/peft_files.py), Arrow's routing in this layer (src/arrow.py), the random-LoRA control
(src/control.py).
"""
import contextlib
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .files import atomic_write
from .errors import BadInput, MissingFile
from .lowrank import truncated_svd

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")                      # the original README
ALL_LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ORIGINAL_CODE_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")  # the original code


class Lora(NamedTuple):
    A: torch.Tensor   # (r, d_in)
    B: torch.Tensor   # (d_out, r)
    scale: float      # alpha / r

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)


@dataclass
class Adapter:
    modules: dict          # module path (as in model.named_modules()) -> Lora
    base_model: str = ""   # what it was trained on, written to adapter_config.json

    def ranks(self) -> dict:
        return {n: lora.A.shape[0] for n, lora in self.modules.items()}


# --------------------------------------------------------------------------------------------------- the layer
class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.scales: list[float] = []
        self.names: list[str] = []                  # each adapter's name (its task): gates and routers index them
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.gate: torch.Tensor | None = None      # (N,) or (batch, N); None means every adapter with weight 1
        self.router: nn.Linear | None = None        # MoA: logits over the N adapters from this layer's input
        self.routing = False                        # route with self.router instead of using self.gate
        self.routes: torch.Tensor | None = None     # (batch,) adapter chosen per sample at the prompt
        self._routed = None                         # each sample's gathered factors for those routes (`routed`)
        self._stack = None                          # inference cache of the stacked factors (see `stacked`)
        self._pad = None                            # inference cache of the padded factors (see `padded`)
        self.arrow = None                           # Arrow: per-token gates from the adapters' prototypes (src/arrow.py)

    @property
    def factor_dtype(self) -> torch.dtype:
        """float32, or float64 on a float64 base: never below float32 (see the module docstring)."""
        return torch.promote_types(self.base.weight.dtype, torch.float32)

    def add(self, A: torch.Tensor, B: torch.Tensor, scale: float, trainable: bool, name: str | None = None):
        self.names.append(str(len(self.names)) if name is None else name)
        where = dict(device=self.base.weight.device, dtype=self.factor_dtype)
        self.A.append(nn.Parameter(A.to(**where), requires_grad=trainable))
        self.B.append(nn.Parameter(B.to(**where), requires_grad=trainable))
        self.scales.append(float(scale))
        ranks = torch.tensor([a.shape[0] for a in self.A])
        # for each of the R = sum(r_i) rank columns: the adapter it belongs to, and that adapter's scale
        self.register_buffer("owner", torch.arange(len(self.A)).repeat_interleave(ranks).to(where["device"]),
                             persistent=False)
        self.register_buffer("rank_scale", torch.tensor(self.scales).repeat_interleave(ranks).to(**where),
                             persistent=False)
        self._stack = self._pad = None

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (R x d_in) and B (d_out x R): all adapters stacked along the rank. Without autograd the stack is kept
        until a factor changes (an in-place update through the parameter bumps its version, one through `.data`
        does not; a move changes its storage)."""
        if len(self.A) == 1:
            return self.A[0], self.B[0]
        if torch.is_grad_enabled():
            return torch.cat(list(self.A), dim=0), torch.cat(list(self.B), dim=1)
        key = self._factors_key()
        if self._stack is None or self._stack[0] != key:
            self._stack = (key, torch.cat(list(self.A), dim=0), torch.cat(list(self.B), dim=1))
        return self._stack[1], self._stack[2]

    def _factors_key(self) -> tuple:
        # where each factor lives and how often it was changed in place: a cache built from them is stale once it moves
        return tuple((p.data_ptr(), p._version) for p in (*self.A, *self.B))

    def rank_weights(self, x: torch.Tensor) -> torch.Tensor:
        """g[b, i] * s_i on each of adapter i's rank columns: (R,) for one gate for all, (batch, R) per sample."""
        if self.arrow is not None:
            gate = self.arrow.gate(x)
            if self.routing and self.routes is None:  # for the report: the top choice at the prompt's last position
                self.routes = (gate[:, -1] if gate.dim() == 3 else gate).argmax(-1)
            return gate.to(self.rank_scale.dtype)[..., self.owner] * self.rank_scale
        if self.gate is None:
            return self.rank_scale
        return self.gate.to(self.rank_scale.dtype)[..., self.owner] * self.rank_scale

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A_i^T (N, d_in, r_max) and (s_i B_i)^T (N, r_max, d_out): each adapter's factors zero-padded to the
        largest rank (zero columns of A^T and rows of B^T add nothing), laid out so that a sample's own adapter is one
        index away and `x @ A_i^T @ (s_i B_i)^T` reads contiguous memory. Kept, like `stacked`, until a factor
        changes."""
        def build():
            r_max = max(a.shape[0] for a in self.A)
            return (torch.stack([F.pad(a.T, (0, r_max - a.shape[0])) for a in self.A]),
                    torch.stack([F.pad(s * b.T, (0, 0, 0, r_max - b.shape[1])) for b, s in zip(self.B, self.scales)]))

        if torch.is_grad_enabled():
            return build()
        key = (self._factors_key(), tuple(self.scales))   # the scales are folded into B here
        if self._pad is None or self._pad[0] != key:
            self._pad = (key, *build())
        return self._pad[1], self._pad[2]

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """MoA's update, each sample through its routed adapter only: dW x = s_k B_k A_k x with k = routes[b].

        At the prompt (prefill) every sample is routed once, on its last position, and its factors are gathered into
        (batch, r_max, d_in) and (batch, d_out, r_max), as multi-LoRA servers do (S-LoRA, Punica); each generated
        token then costs one LoRA's two batched matmuls, whatever N is, instead of all N stacked adapters with N - 1
        masked out. The gathered copies live until the routing block ends: batch x r_max x (d_in + d_out) per layer."""
        if self._routed is None:  # (routes may hold Arrow's top choices, if an Arrow block ended inside this one)
            last = x[:, -1] if x.dim() == 3 else x
            self.routes = self.router(last.to(self.router.weight.dtype)).argmax(-1)
            A_t, B_t = self.padded()
            self._routed = A_t[self.routes], B_t[self.routes]   # (batch, d_in, r_max), (batch, r_max, d_out)
        A_t, B_t = self._routed
        h = self.dropout(x.to(A_t.dtype))
        h = h[:, None] if h.dim() == 2 else h
        delta = torch.bmm(torch.bmm(h, A_t), B_t)
        return delta[:, 0] if x.dim() == 2 else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if len(self.A) == 0:
            return y
        if self.routing and self.arrow is None:
            return y + self.routed(x).to(y.dtype)
        # All adapters at once: stacked A (R x d_in) and B (d_out x R), R = sum of ranks; the gate scales each
        # adapter's r_i columns of the rank-R intermediate, per sample. Two matmuls, whatever N is.
        A, B = self.stacked()
        weights = self.rank_weights(x).to(A.dtype)
        if weights.dim() == 2 and x.dim() == 3:
            weights = weights[:, None, :]
        return y + F.linear(F.linear(self.dropout(x.to(A.dtype)), A) * weights, B).to(y.dtype)

    def extra_repr(self) -> str:
        return f"adapters={len(self.A)}, ranks={[a.shape[0] for a in self.A]}, scales={self.scales}"


def lora_layers(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def inject(model: nn.Module, targets=ATTENTION_TARGETS, dropout: float = 0.0) -> list[str]:
    """Wrap every nn.Linear whose last name is in `targets` in a LoraLinear (no adapters yet) and freeze the model."""
    if lora_layers(model):
        raise BadInput("the model already has LoRA layers: call remove(model) first")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    candidates = sorted({name.rpartition(".")[2] for name in linears})
    unmatched = [t for t in targets if not any(name.rpartition(".")[2] == t for name in linears)]
    if unmatched or not targets:
        raise BadInput(f"target modules {unmatched or list(targets)} match no Linear layer of the model; "
                       f"candidates: {', '.join(candidates)}")
    model.requires_grad_(False)
    names = [name for name in linears if name.rpartition(".")[2] in targets]
    for name in names:
        _set_module(model, name, LoraLinear(linears[name], dropout))
    return names


def remove(model: nn.Module) -> nn.Module:
    """Put the original Linear modules back (adapters and routers are dropped)."""
    for name, layer in lora_layers(model).items():
        _set_module(model, name, layer.base)
    return model


def add_adapter(model: nn.Module, adapter: Adapter | None = None, r: int = 8, alpha: float = 16,
                trainable: bool = False, generator: torch.Generator | None = None, name: str | None = None) -> str:
    """Add `adapter` to every LoRA layer (or a fresh one: A Kaiming-uniform drawn from `generator`, B zeros) under
    `name` (its task; default: its position, "0", "1", ...); returns the name, by which gates, routers and
    `get_adapter` address it."""
    layers = lora_layers(model)
    if not layers:
        raise BadInput("the model has no LoRA layers: call inject(model, targets) first")
    if adapter is not None:
        check_fits(model, adapter)
    held = adapter_names(model)
    name = next(str(i) for i in range(len(held), 2 * len(held) + 1) if str(i) not in held) if name is None else name
    if name in held:
        raise BadInput(f"the model already holds an adapter named {name!r}: give each adapter its own name")
    for module, layer in layers.items():
        if adapter is None:
            A = torch.empty(r, layer.base.in_features, dtype=layer.factor_dtype)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # as loralib and PEFT
            layer.add(A, torch.zeros(layer.base.out_features, r), alpha / r, trainable, name)
        else:
            lora = adapter.modules[module]
            layer.add(lora.A, lora.B, lora.scale, trainable, name)
    return name


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters the LoRA layers hold, in the order of the gates' and routers' columns."""
    layers = lora_layers(model)
    return list(next(iter(layers.values())).names) if layers else []


def adapter_index(model: nn.Module, name: str) -> int:
    """The column of adapter `name` in the gates and routers; a one-line error naming what the model holds."""
    names = adapter_names(model)
    if name not in names:
        raise BadInput(f"no adapter named {name!r} in the model: it holds {', '.join(names) or 'none'}")
    return names.index(name)


def one_hot(model: nn.Module, name: str) -> torch.Tensor:
    """The gate that runs adapter `name` alone (single): 1 in its column, 0 elsewhere."""
    index = adapter_index(model, name)   # first: a model without LoRA layers is a one-line error too
    device = next(iter(lora_layers(model).values())).base.weight.device
    return F.one_hot(torch.tensor(index), len(adapter_names(model))).float().to(device)


def check_fits(model: nn.Module, adapter: Adapter):
    """Raise, naming the module and both shapes, if `adapter` does not fit the model's LoRA layers."""
    layers = lora_layers(model)
    missing, extra = sorted(set(layers) - set(adapter.modules)), sorted(set(adapter.modules) - set(layers))
    if missing or extra:
        raise BadInput(f"adapter modules do not match the model's LoRA layers: missing {missing[:3]}"
                       f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
                       " (were the adapter's target modules the same?)")
    for name, lora in adapter.modules.items():
        base = layers[name].base
        if lora.A.shape[1] != base.in_features or lora.B.shape[0] != base.out_features or lora.A.shape[0] != lora.B.shape[1]:
            raise BadInput(f"adapter does not fit module {name}: A {tuple(lora.A.shape)}, B {tuple(lora.B.shape)} "
                           f"for a Linear of in {base.in_features}, out {base.out_features}")


def get_adapter(model: nn.Module, name: str, base_model: str = "") -> Adapter:
    """A copy of adapter `name`'s factors in every LoRA layer."""
    i = adapter_index(model, name)
    return Adapter({module: Lora(layer.A[i].detach().clone(), layer.B[i].detach().clone(), layer.scales[i])
                    for module, layer in lora_layers(model).items()}, base_model)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in lora_layers(model).values() for p in (*layer.A, *layer.B) if p.requires_grad]


@contextlib.contextmanager
def gated(model: nn.Module, gate: torch.Tensor | None):
    """Within the block every LoRA layer uses `gate`: (N,) for the whole batch or (batch, N) per sample."""
    layers = lora_layers(model).values()
    saved = [layer.gate for layer in layers]
    for layer in layers:
        layer.gate = gate
    try:
        yield
    finally:
        for layer, g in zip(layers, saved):
            layer.gate = g


# ------------------------------------------------------------------------------------------------- folding
def _linear(model: nn.Module, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    return module.base if isinstance(module, LoraLinear) else module


def fold_targets(model: nn.Module, adapter: Adapter) -> dict:
    """{module path: nn.Linear} for every module of the adapter; checks every shape before anything changes."""
    linears = {}
    for name, lora in adapter.modules.items():
        try:
            linears[name] = _linear(model, name)
        except AttributeError:
            raise BadInput(f"cannot fold: the model has no module {name}") from None
        if linears[name].weight.shape != (lora.B.shape[0], lora.A.shape[1]):
            raise BadInput(f"cannot fold into {name}: update {(lora.B.shape[0], lora.A.shape[1])}, "
                           f"weight {tuple(linears[name].weight.shape)}")
    return linears


@torch.no_grad()
def fold(model: nn.Module, adapter: Adapter):
    """W += s B A for every module of the adapter, for good (the update is computed in float32, W keeps its dtype):
    inference at the base model's cost. To take it out again, use `folded`."""
    for name, linear in fold_targets(model, adapter).items():
        lora, W = adapter.modules[name], linear.weight
        delta = lora.scale * (lora.B.to(W.device, torch.float32) @ lora.A.to(W.device, torch.float32))
        W.copy_((W.float() + delta).to(W.dtype))


@contextlib.contextmanager
@torch.no_grad()
def folded(model: nn.Module, adapter: Adapter):
    """Within the block W holds W + s B A; after it, the original W bit for bit (a copy of each targeted weight is
    kept: subtracting the update again would leave rounding error in bf16, and the next method would inherit it)."""
    originals = {name: linear.weight.detach().clone() for name, linear in fold_targets(model, adapter).items()}
    try:
        fold(model, adapter)
        yield model
    finally:
        for name, W in originals.items():
            _linear(model, name).weight.copy_(W)


# ----------------------------------------------------------------------------------------- the paper's merges
def merge_weights(n: int, weights, default: float) -> list[float]:
    """Per-task merge weights: `weights` as floats, or `default` for every task; one per adapter."""
    weights = [default] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise BadInput(f"{len(weights)} merge weights for {n} adapters")
    return weights


def concat(loras: list[Lora], weights=None) -> Lora:
    """Concatenation: one adapter of rank sum(r_i) whose update is exactly sum_i w_i s_i B_i A_i,
    A = [A_1; ...; A_n], B = [w_1 s_1 B_1 ... w_n s_n B_n], scale 1 (w_i = 1: the original)."""
    w = merge_weights(len(loras), weights, 1.0)
    A = torch.cat([l.A for l in loras], dim=0)
    B = torch.cat([wi * l.scale * l.B for wi, l in zip(w, loras)], dim=1)
    return Lora(A, B, 1.0)


def weight_sum(loras: list[Lora], weights=None) -> Lora:
    """The original's "weighted": A = sum w_i A_i, B = sum w_i B_i, common scale s, so the update
    s (sum_i w_i B_i)(sum_j w_j A_j) has the cross terms B_i A_j. w_i = 1 is the paper's weight summing, w_i = 1/N
    the log's "weighted_avg". Needs equal ranks and scales."""
    w = merge_weights(len(loras), weights, 1.0)
    ranks, scales = {l.A.shape[0] for l in loras}, {l.scale for l in loras}
    if len(ranks) > 1 or len(scales) > 1:
        raise BadInput(f"weight_sum needs equal ranks and scales, got ranks {sorted(ranks)} and scales "
                       f"{sorted(scales)}: use concat or svd for these adapters")
    A = sum(wi * l.A for wi, l in zip(w, loras))
    B = sum(wi * l.B for wi, l in zip(w, loras))
    return Lora(A, B, loras[0].scale)


def weighted_avg(loras: list[Lora], weights=None) -> Lora:
    """The thesis log's "weighted_avg": weight_sum with w_i = 1/N (A = mean A_i, B = mean B_i)."""
    return weight_sum(loras, merge_weights(len(loras), weights, 1.0 / len(loras)))


def svd_merge(loras: list[Lora], weights=None, rank: int = 8) -> Lora:
    """The thesis's SVD merge: the rank-k truncated SVD U_k S_k V_k^T of the mean update
    sum_i w_i s_i B_i A_i (w_i = 1/N), as B = U_k S_k, A = V_k^T, scale 1. Computed from the stacked factors B A
    (`concat`) by `lowrank.truncated_svd`, never forming the d_out x d_in update."""
    stacked = concat(loras, merge_weights(len(loras), weights, 1.0 / len(loras)))
    Bk, _, Ak = truncated_svd(stacked.B, stacked.A, rank)
    dtype = loras[0].A.dtype
    return Lora(Ak.to(dtype).contiguous(), Bk.to(dtype).contiguous(), 1.0)


# ---------------------------------------------------------------------------------------------------------- MoA
def make_routers(model: nn.Module, n_routes: int, generator: torch.Generator | None = None) -> nn.ModuleList:
    """One float32 router nn.Linear(d_in, n_routes) per LoRA layer (lora_layers order), not attached yet;
    initialised as nn.Linear is, from `generator` when given."""
    routers = nn.ModuleList()
    for layer in lora_layers(model).values():
        d_in = layer.base.in_features
        router = nn.Linear(d_in, n_routes, device=layer.base.weight.device)
        if generator is not None:
            with torch.no_grad():
                bound = 1 / math.sqrt(d_in)
                router.weight.copy_(torch.empty(n_routes, d_in).uniform_(-bound, bound, generator=generator))
                router.bias.copy_(torch.empty(n_routes).uniform_(-bound, bound, generator=generator))
        routers.append(router)
    return routers


def attach_routers(model: nn.Module, routers: nn.ModuleList):
    """Put `routers` (one per LoRA layer, in lora_layers order: the original's per-layer MoA router) into the layers."""
    layers = list(lora_layers(model).values())
    if len(routers) != len(layers):
        raise BadInput(f"{len(routers)} routers for {len(layers)} LoRA layers")
    for layer, router in zip(layers, routers):
        if router.out_features != len(layer.A):
            raise BadInput(f"a router over {router.out_features} adapters, but the layer holds {len(layer.A)}")
        layer.router = router


@contextlib.contextmanager
def routing(model: nn.Module):
    """MoA inference: within the block, the first forward (the prompt) routes each sample in every layer and the
    following forwards (generated tokens) keep those choices. Read them with `route_decisions` inside the block."""
    layers = list(lora_layers(model).values())
    if not layers or any(layer.router is None and layer.arrow is None for layer in layers):
        raise BadInput("the model has no MoA routers: attach_routers / load_routers (or use arrow_routing) first")
    for layer in layers:
        layer.routing, layer.routes = True, None
    try:
        yield
    finally:
        for layer in layers:
            layer.routing, layer.routes, layer._routed = False, None, None


def route_decisions(model: nn.Module) -> torch.Tensor:
    """(batch, layers) adapter index chosen by every layer's router, in lora_layers order."""
    return torch.stack([layer.routes for layer in lora_layers(model).values()], dim=1)


def hook_distinct_inputs(modules: list, new, same) -> list:
    """Forward pre-hooks that see each distinct input tensor once: modules fed the very tensor the module called
    just before received (q, k and v read one hidden state; gate and up another) are told so instead. new(i, x):
    modules[i] receives a new input x; same(i, j): modules[i] receives the input modules[j] received first. Returns
    the hooks' handles, to remove."""
    first = [None, None]   # the last new input, and the index of the module that received it

    def hook(i, module, args):
        if args[0] is first[0]:
            same(i, first[1])
        else:
            first[:] = [args[0], i]
            new(i, args[0])

    return [m.register_forward_pre_hook(functools.partial(hook, i)) for i, m in enumerate(modules)]


@torch.no_grad()
def router_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  gold: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """Every LoRA layer's input at the last prompt position, with each sample's gold adapter active (teacher
    forcing, as the original trained its routers). Prompts must be left-padded.

    Returns (features, where): features, the U distinct inputs, each (batch, d_in of the layers reading it) in the
    model's dtype (q, k and v read the same tensor, so it is kept once; so do gate and up; down_proj's input is
    intermediate_size wide, the others hidden_size, hence a list rather than one stacked tensor), and for each LoRA
    layer the index of its input among them. The routers do not change these inputs (the gold adapter is used, not
    the routed one), so they can be computed once and the routers trained on them as classifiers: the same
    gradients as the original's loop."""
    layers = list(lora_layers(model).values())
    captured, where = [], [None] * len(layers)

    def new(i, x):
        captured.append(x[:, -1].clone())
        where[i] = len(captured) - 1

    hooks = hook_distinct_inputs(layers, new, lambda i, j: where.__setitem__(i, where[j]))
    gate = F.one_hot(gold, len(layers[0].A)).float()
    try:
        with gated(model, gate):
            model.base_model(input_ids=input_ids, attention_mask=attention_mask)  # hidden states only, no lm head
    finally:
        for h in hooks:
            h.remove()
    return captured, where


def router_loss(routers: nn.ModuleList, features: list[torch.Tensor], where: list[int],
                labels: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the R routers of each router's cross-entropy on its layer's features, features[where[l]]
    (batch, d_in of layer l): loss = 1/R sum_l CE(router_l(x_l), labels), the samples' CE averaged (reduction
    "mean") or summed ("sum"); also each layer's predictions (layers, batch)."""
    logits = torch.stack([r(features[u].to(r.weight.dtype)) for r, u in zip(routers, where)]).float()
    loss = F.cross_entropy(logits.flatten(0, 1), labels.repeat(len(routers)), reduction=reduction)
    return (loss / len(routers) if reduction == "sum" else loss), logits.argmax(-1)


def save_routers(model: nn.Module, folder, tasks: list[str], base_model: str, extra: dict | None = None):
    """The routers of every LoRA layer, over the adapters the model holds, which are `tasks` (in that order)."""
    if adapter_names(model) != list(tasks):
        raise ValueError(f"routers over adapters {adapter_names(model)} saved as routers over {list(tasks)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = lora_layers(model)
    tensors = {f"{name}.router.{p}": getattr(layer.router, p).detach().float().contiguous()
               for name, layer in layers.items() for p in ("weight", "bias")}
    meta = {"tasks": list(tasks), "layers": list(layers), "base_model": base_model, **(extra or {})}
    atomic_write(folder / "routers.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write(folder / "routers.json", lambda p: p.write_text(json.dumps(meta, indent=2)))


def load_routers(model: nn.Module, folder, tasks: list[str], hint: str = "") -> dict:
    """Load routers trained over `tasks` into a model holding those tasks' adapters (by name, in any order: each
    router's logits are put in the order the model holds the adapters)."""
    folder = Path(folder)
    for p in (folder / "routers.json", folder / "routers.safetensors"):
        if not p.exists():
            raise MissingFile(f"missing router file {p}" + (f": create it with `{hint}`" if hint else ""))
    try:
        meta = json.loads((folder / "routers.json").read_text())
        tensors = load_file(str(folder / "routers.safetensors"))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise BadInput(f"corrupt routers in {folder} ({str(e).splitlines()[0]}): train them again") from e
    if sorted(meta["tasks"]) != sorted(tasks):
        raise BadInput(f"routers in {folder} were trained for tasks {meta['tasks']}, not {list(tasks)}: train them "
                       f"for these tasks (train_moa.py --tasks {','.join(tasks)})")
    layers = lora_layers(model)
    if meta["layers"] != list(layers):
        raise BadInput(f"routers in {folder} do not match the model's LoRA layers (other targets or model?)")
    held = adapter_names(model)
    if sorted(held) != sorted(meta["tasks"]):
        raise BadInput(f"routers in {folder} route between adapters {meta['tasks']}, the model holds {held}: "
                       "add_adapter each of them, named by its task")
    order = [meta["tasks"].index(n) for n in held]   # a router's logit per adapter, in the order the model holds them
    routers = make_routers(model, len(tasks))
    for name, router in zip(layers, routers):
        saved = tensors.get(f"{name}.router.weight")
        if saved is None or saved.shape != router.weight.shape:
            raise BadInput(f"routers in {folder} do not fit layer {name} (router weight "
                           f"{None if saved is None else tuple(saved.shape)}, the layer needs "
                           f"{tuple(router.weight.shape)}): train them again for this model")
    with torch.no_grad():
        for name, router in zip(layers, routers):
            router.weight.copy_(tensors[f"{name}.router.weight"][order])
            router.bias.copy_(tensors[f"{name}.router.bias"][order])
    attach_routers(model, routers)
    return meta
