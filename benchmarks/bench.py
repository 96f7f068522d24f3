"""Side-by-side benchmarks: our LoRA, merges and MoA against PEFT and the base model. Ratios, not seconds.

    python benchmarks/bench.py                      # every case, each in its own process; writes results/bench.{json,md}
    python benchmarks/bench.py --case svd-qwen2-1.5b # one case, printed as JSON
    python benchmarks/bench.py --device cuda --out results/bench-gpu   # on a GPU: bf16, Qwen2-1.5B shapes

Method: each comparison runs in a fresh process; after one warm-up of each side, the two sides are timed
alternately, `--reps` times each (default 5; at most 2 or 3 where PEFT takes a minute and more per call: its SVD
forms at Qwen2-1.5B shapes), and the medians are compared. `ratio` is always
time(reference) / time(ours) (or ours' throughput / the reference's): above 1 means ours is faster.

Models: the merge cases use adapters on the attention projections (q, k, v, o) of every layer, with the module
paths and shapes of the embedded SmolLM2-135M and of Qwen2-1.5B (hidden 1536, 28 layers, 12 heads, 2 KV heads);
a merge touches only those modules, so the Qwen2-1.5B case builds just them. Training and inference run the whole
model: the embedded model on the CPU, a random-initialised Qwen2-1.5B on a GPU.
"""
import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from src import arrow  # noqa: E402
from src import lora  # noqa: E402
from src.files import atomic_write  # noqa: E402
from src import merges  # noqa: E402
from src import registry  # noqa: E402

N_ADAPTERS, RANK, ALPHA = 7, 8, 16
QWEN2_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def compare(ours, reference, reps: int, device="cpu") -> dict:
    """Median seconds of each side over `reps` alternating runs after one warm-up of each."""
    ours(), reference()
    t_ours, t_ref = [], []
    for _ in range(reps):
        for fn, times in ((ours, t_ours), (reference, t_ref)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
    m_ours, m_ref = statistics.median(t_ours), statistics.median(t_ref)
    return {"ours_s": m_ours, "reference_s": m_ref, "ratio": m_ref / m_ours, "reps": reps}


# ------------------------------------------------------------------------------------------------------ models
def attention_skeleton(layers: int, hidden: int, kv: int) -> nn.Module:
    """Just the attention projections of a decoder, under the same module paths as the Hugging Face model."""
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList()
    for _ in range(layers):
        block = nn.Module()
        block.self_attn = nn.Module()
        for name, d_out in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv), ("o_proj", hidden)):
            setattr(block.self_attn, name, nn.Linear(hidden, d_out, bias=name != "o_proj"))
        model.model.layers.append(block)
    return model


def merge_model(shape: str) -> nn.Module:
    if shape == "qwen2-1.5b":
        return attention_skeleton(28, 1536, 256)
    from transformers import AutoConfig, AutoModelForCausalLM

    from src.models import embedded_model_dir

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(embedded_model_dir()))


def full_model(device, dtype):
    """The embedded model on the CPU; a random-initialised Qwen2-1.5B on a GPU (no hub there either)."""
    if str(device).startswith("cuda"):
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_1_5B)).to(dtype)
        model.requires_grad_(False)
        return model.eval(), "Qwen2-1.5B-shaped, random init"
    from src.models import load_model

    model, _ = load_model("smollm2-135m", device=device, dtype=dtype)
    return model, "SmolLM2-135M (embedded)"


def random_adapters(model: nn.Module, n: int, gen: torch.Generator, std=0.02) -> list:
    """Adapters shaped like trained ones: B's columns decay (0.7^j), and each task has its own overall size
    (0.5x to 2x), so the summed update has a spread spectrum rather than clustered singular values."""
    lora.inject(model)
    shapes = {name: (layer.base.in_features, layer.base.out_features) for name, layer in lora.lora_layers(model).items()}
    lora.remove(model)
    decay = 0.7 ** torch.arange(RANK, dtype=torch.float32)
    sizes = 0.5 + 1.5 * torch.rand(n, generator=gen)
    return [lora.Adapter({name: lora.Lora(torch.randn(RANK, d_in, generator=gen) * std,
                                    torch.randn(d_out, RANK, generator=gen) * std * decay * sizes[i], ALPHA / RANK)
                       for name, (d_in, d_out) in shapes.items()}) for i in range(n)]


def peft_with(model: nn.Module, adapters: list):
    """The same adapters loaded into PEFT, as t0..t{n-1}."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(lora.ATTENTION_TARGETS), lora_dropout=0.0)
    peft_model = get_peft_model(model, config, adapter_name="t0")
    for i in range(1, len(adapters)):
        peft_model.add_adapter(f"t{i}", config)
    lora_model = peft_model.base_model
    with torch.no_grad():
        for i, adapter in enumerate(adapters):
            for name, factors in adapter.modules.items():
                module = lora_model.model.get_submodule(name)
                module.lora_A[f"t{i}"].weight.copy_(factors.A)
                module.lora_B[f"t{i}"].weight.copy_(factors.B)
    return peft_model


# ------------------------------------------------------------------------------------------------------- cases
PEFT_NAMES = {"svd": "svd", "concat": "cat", "weight_sum": "linear", "ties": "ties", "dare_linear": "dare_linear",
              "dare_ties": "dare_ties", "magnitude_prune": "magnitude_prune"}
PARAMS = {"ties": dict(density=0.2, lam=1.0), "magnitude_prune": dict(density=0.2, lam=1.0),
          "dare_linear": dict(p=0.9, lam=1.0), "dare_ties": dict(p=0.9, lam=1.0)}


def peft_call(method: str, svd_form: bool) -> tuple[str, dict]:
    """PEFT's combination_type and keyword arguments for our method (PEFT's DARE density is our 1 - p)."""
    params = PARAMS.get(method, {})
    kwargs = {}
    if "density" in params:
        kwargs["density"] = params["density"]
    if "p" in params:
        kwargs["density"] = 1 - params["p"]
    name = PEFT_NAMES[method] + ("_svd" if svd_form and method != "svd" else "")
    if svd_form or method == "svd":
        kwargs["svd_rank"] = RANK
    return name, kwargs


def peft_delta(peft_model, module_name: str, adapter: str) -> torch.Tensor:
    module = peft_model.base_model.model.get_submodule(module_name)
    return module.scaling[adapter] * (module.lora_B[adapter].weight @ module.lora_A[adapter].weight).double()


def worst_rel(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b)


def case_merge(method: str, shape: str, reps: int, svd_form: bool = False) -> dict:
    """Our merge against PEFT's add_weighted_adapter on the same 7 adapters, and the per-module difference.

    Before any PEFT number is used, PEFT merges one adapter alone (density 1, no drop) and must give it back
    (PEFT has had bugs there: svd types scaled twice, a DARE rescale that did nothing).
    Scales: PEFT's svd and cat multiply each adapter's delta by weight * scaling and give the merged adapter
    r = alpha (scale 1), as ours does. PEFT's linear (and its non-svd ties / dare / magnitude_prune) put
    sqrt(weight * scaling) on both A and B and merge the A's and the B's separately: with w = 1 and equal scales
    "linear" is our weight_sum; the others are another definition than TIES / DARE / pruning of the updates D_i.
    PEFT's *_svd forms apply the method to the dense updates and truncate: our dense form of the method, at rank 8."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = merge_model(shape)
    adapters = random_adapters(model, N_ADAPTERS, gen)
    combination, kwargs = peft_call(method, svd_form)

    one = peft_with(copy.deepcopy(model), adapters[:1])
    one.add_weighted_adapter(["t0"], [1.0], "one", combination_type=combination,
                             **{**kwargs, **({"density": 1.0} if "density" in kwargs else {})})
    identity = worst_rel({n: peft_delta(one, n, "one") for n in adapters[0].modules},
                         {n: l.delta().double() for n, l in adapters[0].modules.items()})
    del one

    peft_model = peft_with(model, adapters)
    weights = [1.0 / N_ADAPTERS] * N_ADAPTERS if method == "svd" else [1.0] * N_ADAPTERS
    names = [f"t{i}" for i in range(N_ADAPTERS)]
    truncate = {} if method == "svd" else ({"rank": RANK} if svd_form else {})

    def ours():
        return merges.merge(adapters, method, weights=weights, **truncate, **PARAMS.get(method, {}))

    def reference():
        if "merged" in peft_model.peft_config:
            peft_model.delete_adapter("merged")
        peft_model.add_weighted_adapter(names, weights, "merged", combination_type=combination, **kwargs)

    result = compare(ours, reference, reps)
    merged = ours()
    theirs = {n: peft_delta(peft_model, n, "merged") for n in merged.modules}
    mine = {n: l.delta().double() for n, l in merged.modules.items()}
    out = {**result, "peft_combination": combination, "peft_one_adapter_rel_diff": identity,
           "max_rel_frobenius_diff": worst_rel(mine, theirs), "modules": len(merged.modules), "shape": shape}
    if svd_form and method in ("ties", "magnitude_prune"):  # deterministic: PEFT against our dense form, same math
        subset = sorted(merged.modules)[:8]
        dense = merges.merge([lora.Adapter({n: a.modules[n] for n in subset}) for a in adapters], method, weights=weights,
                        rank=RANK, dense=True, **PARAMS[method])
        out["peft_vs_our_dense_rel_diff"] = worst_rel({n: theirs[n] for n in subset},
                                                      {n: l.delta().double() for n, l in dense.modules.items()})
        out["dense_modules"] = len(subset)
    if method == "svd" and shape == "smollm2":  # a float64 dense reference too (too slow on a CPU at Qwen2-1.5B shapes)
        worst_dense = {"ours": 0.0, "peft": 0.0}
        for name in merged.modules:
            dense = sum(w * a.modules[name].delta().double() for w, a in zip(weights, adapters))
            U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
            ref = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
            for side, upd in (("ours", mine[name]), ("peft", theirs[name])):
                worst_dense[side] = max(worst_dense[side], ((upd - ref).norm() / ref.norm()).item())
        out["max_rel_diff_vs_dense_float64"] = worst_dense
    return out


def case_core_vs_dense(method: str, reps: int, modules: int = 16) -> dict:
    """A method computed in the core space against the same method on the dense updates (our own dense form),
    SmolLM2-135M shapes, the first `modules` modules: time ratio and the largest relative difference (float32
    rounding of the merged factors, about 1e-7, for the basis-invariant methods; entry-wise ones differ by design)."""
    gen = torch.Generator().manual_seed(0)
    adapters = random_adapters(merge_model("smollm2"), N_ADAPTERS, gen)
    subset = sorted(adapters[0].modules)[:modules]
    adapters = [lora.Adapter({n: a.modules[n] for n in subset}) for a in adapters]
    result = compare(lambda: merges.merge(adapters, method), lambda: merges.merge(adapters, method, dense=True), reps)
    core = {n: l.delta().double() for n, l in merges.merge(adapters, method).modules.items()}
    dense = {n: l.delta().double() for n, l in merges.merge(adapters, method, dense=True).modules.items()}
    return {**result, "max_rel_frobenius_diff": worst_rel(core, dense), "modules": len(subset), "shape": "smollm2",
            "exact": registry.get_method(method).exact}


def training_batch(model, device, batch=8, seq=128, target=32):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 1, (batch, seq), generator=gen).to(device)
    labels = ids.clone()
    labels[:, :seq - target] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def case_train(loss_kind: str, device, dtype, reps: int) -> dict:
    """One AdamW step on 8 x 128 tokens (loss on the last 32): ours against PEFT LoRA, same targets, r, alpha.

    loss_kind "same": both sides use our loss (vocabulary projection only at target positions), isolating the
    LoRA layer. "as-shipped": ours as our trainer runs it, PEFT with the model's own loss (full logits)."""
    from peft import LoraConfig, get_peft_model

    from src.train import lm_loss

    model, label = full_model(device, dtype)
    batch = training_batch(model, device)
    torch.manual_seed(0)
    ours_model = model
    lora.inject(ours_model)
    lora.add_adapter(ours_model, r=RANK, alpha=ALPHA, trainable=True)
    ours_opt = torch.optim.AdamW(lora.adapter_parameters(ours_model), lr=1e-4)

    plain = copy.deepcopy(ours_model)
    lora.remove(plain)
    peft_model = get_peft_model(plain, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(lora.ATTENTION_TARGETS)))
    peft_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    hf_model = peft_model.base_model.model

    def step(m, opt, loss_fn):
        loss = loss_fn(m)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ours():
        step(ours_model, ours_opt, lambda m: lm_loss(m, batch)[0])

    def reference():
        if loss_kind == "same":
            step(hf_model, peft_opt, lambda m: lm_loss(m, batch)[0])
        else:
            step(peft_model, peft_opt, lambda m: m(**batch).loss)

    result = compare(ours, reference, reps, device)
    tokens = batch["input_ids"].numel()
    return {**result, "model": label, "ours_tokens_per_s": tokens / result["ours_s"],
            "reference_tokens_per_s": tokens / result["reference_s"]}


def case_train_padded(device, dtype, reps: int) -> dict:
    """Forward and backward of our training loss on 8 right-padded sequences of 128 down to 80 tokens (21% padding,
    about the 19% of the cpu preset's batches; loss on the last 32 of each): the frozen layers skipping the padded
    tokens (as the trainer runs) against computing them. Also whether the two give bitwise-equal gradients."""
    from src.data import pad_batch
    from src.train import TargetLoss

    model, label = full_model(device, dtype)
    lora.inject(model)
    lora.add_adapter(model, r=RANK, alpha=ALPHA, trainable=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora.adapter_parameters(model):
            p.normal_(0, 0.02)  # B = 0 would zero A's gradient
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(100, model.config.vocab_size - 1, (n,), generator=gen).tolist()
            for n in (128, 120, 110, 100, 96, 90, 84, 80)]
    batch = pad_batch(seqs, 0, left=False, labels=[[-100] * (len(s) - 32) + s[-32:] for s in seqs])
    batch = {k: v.to(device) for k, v in batch.items()}
    params = lora.adapter_parameters(model)

    def grads(skip: bool):
        loss, _ = TargetLoss(model, skip_padding=skip)(**batch)
        return torch.autograd.grad(loss, params)

    result = compare(lambda: grads(True), lambda: grads(False), reps, device)
    same = all(torch.equal(a, b) for a, b in zip(grads(True), grads(False)))
    real = int(batch["attention_mask"].sum())
    return {**result, "model": label, "padding": 1 - real / batch["attention_mask"].numel(),
            "bitwise_equal_gradients": same, "ours_tokens_per_s": real / result["ours_s"],
            "reference_tokens_per_s": real / result["reference_s"]}


def single_and_all(model: nn.Module, adapters: list) -> nn.Module:
    """A copy of `model` holding the first adapter alone (the single-LoRA reference); `model` itself gets them all."""
    single = copy.deepcopy(model)
    lora.inject(single)
    lora.add_adapter(single, adapters[0])
    lora.inject(model)
    for a in adapters:
        lora.add_adapter(model, a)
    return single


def case_inference(kind: str, device, dtype, reps: int) -> dict:
    """Greedy generation of 32 tokens for 8 prompts of 64 tokens.

    folded-vs-base:     an SVD-merged adapter folded into W against the base model (the physical limit);
    concat-unfolded:    7 adapters active in the LoRA layers against the same concat folded into W;
    moa-vs-single:      MoA (7 adapters, routers, per-sample routes) against one LoRA, both batched;
    moa-gathered-vs-masked: MoA as it runs (each sample's routed factors gathered) against the same routes as
                        per-layer one-hot gates over all 7 stacked adapters (how it ran before); the tokens must agree;
    moa-batched-vs-bs1: MoA batched against MoA one prompt at a time (how the original had to evaluate);
    arrow-vs-single:    Arrow (7 adapters, per-token gates, top 3 at temperature 1) against one LoRA, both batched."""
    model, label = full_model(device, dtype)
    gen = torch.Generator().manual_seed(0)
    adapters = [lora.Adapter({n: lora.Lora(l.A.to(device, dtype), l.B.to(device, dtype), l.scale) for n, l in a.modules.items()})
                for a in random_adapters(model, N_ADAPTERS, gen)]
    ids = torch.randint(100, model.config.vocab_size - 1, (8, 64), generator=gen).to(device)
    mask = torch.ones_like(ids)

    def greedy(m=model, x=ids, x_mask=mask, route=False):
        with torch.no_grad(), (lora.routing(m) if route else nullcontext()):
            return m.generate(input_ids=x, attention_mask=x_mask, max_new_tokens=32, min_new_tokens=32,
                              do_sample=False, pad_token_id=0)

    tokens = ids.shape[0] * 32
    if kind == "folded-vs-base":
        base_model = copy.deepcopy(model)
        lora.fold(model, merges.merge(adapters, "svd", rank=RANK))
        result = compare(greedy, lambda: greedy(base_model), reps, device)
    elif kind == "concat-unfolded":
        folded = copy.deepcopy(model)
        lora.fold(folded, merges.merge(adapters, "concat"))
        lora.inject(model)
        for a in adapters:
            lora.add_adapter(model, a)
        result = compare(greedy, lambda: greedy(folded), reps, device)  # ratio < 1: unfolded is slower
    elif kind == "arrow-vs-single":
        single = single_and_all(model, adapters)
        with arrow.arrow_routing(model, top_k=3, temperature=1.0):
            result = compare(greedy, lambda: greedy(single), reps, device)
    elif kind in ("moa-vs-single", "moa-batched-vs-bs1", "moa-gathered-vs-masked"):
        single = single_and_all(model, adapters)
        lora.attach_routers(model, lora.make_routers(model, N_ADAPTERS, generator=torch.Generator().manual_seed(1)))

        def moa_bs1():
            for i in range(ids.shape[0]):
                greedy(x=ids[i:i + 1], x_mask=mask[i:i + 1], route=True)
        if kind == "moa-gathered-vs-masked":
            with torch.no_grad(), lora.routing(model):  # the routes of this very run, for the masked reference
                gathered = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32,
                                          do_sample=False, pad_token_id=0)
                decisions = lora.route_decisions(model)

            def masked():
                layers = lora.lora_layers(model).values()
                for layer, chosen in zip(layers, decisions.T):
                    layer.gate = torch.nn.functional.one_hot(chosen, N_ADAPTERS).to(dtype)
                try:
                    return greedy()
                finally:
                    for layer in layers:
                        layer.gate = None
            same = torch.equal(gathered, masked())
            result = {**compare(lambda: greedy(route=True), masked, reps, device),
                      "note": "greedy tokens identical" if same else "**greedy tokens differ**"}
        else:
            reference = (lambda: greedy(single)) if kind == "moa-vs-single" else moa_bs1
            result = compare(lambda: greedy(route=True), reference, reps, device)
    else:
        raise ValueError(kind)
    return {**result, "model": label, "ours_tokens_per_s": tokens / result["ours_s"],
            "reference_tokens_per_s": tokens / result["reference_s"]}


def case_eval(device, dtype, reps: int) -> dict:
    """full_evaluation.py's generation path on one task (sentiment, 20 rows, single LoRA): batched (20) against
    one row at a time (the original's MoA evaluation), rows per second."""
    from src.data import fit_prompt, load_rows
    from src.evaluation import generate
    from src.models import load_model
    from src.tasks import get_task

    model, tokenizer = load_model("smollm2-135m", device=device, dtype=dtype)
    task = get_task("sentiment")
    rows = load_rows(task, "eval", n=20)
    prompts = [fit_prompt(task, r, tokenizer, 192) for r in rows]
    adapter = random_adapters(model, 1, torch.Generator().manual_seed(0))[0]
    lora.inject(model)
    lora.add_adapter(model, adapter)
    result = compare(lambda: generate(model, tokenizer, prompts, task.max_new_tokens, 20),
                     lambda: generate(model, tokenizer, prompts, task.max_new_tokens, 1), reps, device)
    return {**result, "rows": len(rows), "ours_rows_per_s": len(rows) / result["ours_s"],
            "reference_rows_per_s": len(rows) / result["reference_s"]}


# ------------------------------------------------------------------------------------------ RegMean's memory
QWEN2_0_5B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
SHAPES = {"qwen2-0.5b": QWEN2_0_5B, "qwen2-1.5b": QWEN2_1_5B}
TARGET_SETS = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
               "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
REGMEAN_ROWS, REGMEAN_TOKENS = 4, 64   # rows per adapter, tokens per row


class RandomRows:
    """An adapter's rows for the memory benchmark: random token ids (the Grams' size does not depend on the text)."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def training_examples(self, n: int, tokenizer, window: int) -> tuple:
        ids = torch.randint(0, 151936, (n, REGMEAN_TOKENS), generator=self.gen)
        return [{"input_ids": row.tolist()} for row in ids], {"rows": n}


def regmean_setup(shape: str, layers: int, targets: str, n: int, device):
    """A random-initialised Qwen2-shaped model cut to `layers` layers (float32; nothing downloaded), n random
    rank-8 adapters on `targets`, and each adapter's rows."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from types import SimpleNamespace

    from src import merge_fit

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**{**SHAPES[shape], "num_hidden_layers": layers})).eval()
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rpartition(".")[2] in TARGET_SETS[targets]}
    adapters = [lora.Adapter({name: lora.Lora(torch.randn(RANK, m.in_features, generator=gen) * 0.02,
                                              torch.randn(m.out_features, RANK, generator=gen) * 0.02, ALPHA / RANK)
                              for name, m in linears.items()}) for _ in range(n)]
    names = [f"adapter{i}" for i in range(n)]
    data = merge_fit.FitData(model, SimpleNamespace(eos_token_id=0, model_max_length=4096), names, batch_size=4,
                             sources={t: RandomRows(i) for i, t in enumerate(names)})
    return model, adapters, data


def regmean_per_task(adapters: list, data, rows: int, alpha: float) -> lora.Adapter:
    """RegMean as it was before the summed statistics: every task's Gram matrices held at once
    (merge_fit.gram_matrices, n d_in x d_in float64 per input), then merges.regmean per module."""
    from src import merge_fit

    adapters = merges.over_union(adapters)
    examples, _ = data.training_examples(rows)
    grams = [merge_fit.gram_matrices(data.model, a, examples[t], data.batch_size, 0) for t, a in zip(data.tasks, adapters)]
    return lora.Adapter({name: merges.regmean([a.modules[name] for a in adapters], [g[name] for g in grams], alpha)
                         for name in sorted(adapters[0].modules)})


def regmean_memory_case(impl: str, shape: str, layers: int, targets: str, n: int, device, memory=None) -> dict:
    """One RegMean merge at alpha 0.9 in this process: the peak memory beyond what the model, the adapters and
    the rows hold before it (RSS on the CPU: ru_maxrss, which only grows, hence one case per process; on a GPU
    max_memory_allocated), and its seconds."""
    import resource

    import psutil

    from src import merge_fit

    model, adapters, data = regmean_setup(shape, layers, targets, n, device)
    with torch.no_grad():   # a forward of the rows' shape first: lazily allocated buffers are not the merge's
        model(input_ids=torch.zeros(4, REGMEAN_TOKENS, dtype=torch.long, device=device))
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = psutil.Process().memory_info().rss
    peak_before = 0 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # the set-up's own peak
    start = time.perf_counter()
    info = {}
    if impl == "per-task":
        merged = regmean_per_task(adapters, data, REGMEAN_ROWS, 0.9)
    else:
        make, info = merge_fit.regmean(adapters, data, REGMEAN_ROWS, memory=memory, alpha=0.9)
        merged = make({"alpha": 0.9})
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"impl": impl, "shape": shape, "layers": layers, "targets": targets, "n": n, "seconds": seconds,
            "peak_beyond_model_bytes": peak - before, "model_bytes": before, "merge_set_the_peak": peak > peak_before, "modules": len(merged.modules),
            "passes": info.get("gram_memory", {}).get("passes", 1), "rows": REGMEAN_ROWS, "tokens": REGMEAN_TOKENS}


def regmean_precision(rows: int = 32) -> dict:
    """What float32 batch products (summed in float64) would change in RegMean on a real model: the embedded
    SmolLM2-135M, seven random rank-8 adapters on its attention projections, each task's first `rows` shipped train
    rows. The largest Gram entry error against float64 relative to sqrt(G_jj G_kk), the condition number of G' at
    alpha 1 and 0.9, and the merged update's relative change (Frobenius, the worst module)."""
    import tempfile

    from src import merge_fit
    from src.data import load_rows
    from src.models import load_model
    from src.tasks import SEVEN_TASKS, get_task

    model, tokenizer = load_model("smollm2-135m")
    gen = torch.Generator().manual_seed(2)
    adapters = random_adapters(model, len(SEVEN_TASKS), gen)
    with tempfile.TemporaryDirectory() as tmp:
        sources = {}
        for t in SEVEN_TASKS:
            task, path = get_task(t), Path(tmp) / f"{t}.jsonl"
            path.write_text("".join(json.dumps({"prompt": task.prompt(r), "target": task.target(r)}) + "\n"
                                    for r in load_rows(task, "train", "local", n=rows)))
            sources[t] = merge_fit.FileRows.read(path)
        data = merge_fit.FitData(model, tokenizer, list(SEVEN_TASKS), sources=sources, batch_size=8)
        examples, _ = data.training_examples(rows)
    examples = [examples[t] for t in SEVEN_TASKS]
    inputs = merge_fit.model_inputs(model, adapters[0])
    out = {"rows_per_task": rows, "tasks": len(SEVEN_TASKS)}
    stats = {dtype: merge_fit.regmean_pass(model, adapters, examples, inputs, 8, tokenizer.eos_token_id, dtype=dtype)
             for dtype in (torch.float64, torch.float32)}
    (exact, p64), (single, p32) = stats[torch.float64], stats[torch.float32]
    out["max_gram_error_rel_to_sqrt_diag"] = max(
        float(((single[k].summed - s.summed).abs() / torch.sqrt(torch.outer(s.summed.diagonal(), s.summed.diagonal()))
               ).max()) for k, s in exact.items())
    for alpha in (1.0, 0.9):
        conds, changes = [], []
        for inp in inputs:
            key = inp.modules[0]
            G = alpha * exact[key].summed + (1 - alpha) * torch.diag(exact[key].diagonals.sum(0))
            conds.append(float(torch.linalg.cond(G)))
            for m in inp.modules:
                loras = [a.modules[m] for a in adapters]
                d64 = merges.regmean_solve(loras, exact[key], p64[m], alpha).delta().double()
                d32 = merges.regmean_solve(loras, single[key], p32[m], alpha).delta().double()
                changes.append(float(torch.linalg.norm(d32 - d64) / torch.linalg.norm(d64)))
        out[f"alpha_{alpha}"] = {"max_condition_number": max(conds), "median_condition_number": statistics.median(conds),
                                 "max_rel_update_change": max(changes)}
    return out


REGMEAN_GRID = [  # (targets, layers): the whole Qwen2-0.5B for attention; for all linear layers, as many layers as
    ("attention", 24), ("all-linear", 8)]   # the per-task form fits here at n = 7 (n = 14 would need 23 GB of Grams)
REGMEAN_NS = (2, 4, 7, 14)
PER_TASK_FITS = 12e9   # the per-task form is run only where its Grams (n x the summed ones) take at most this


def regmean_gram_bytes(shape: str, layers: int, targets: str) -> int:
    """One set of Gram matrices in float64: per layer, q/k/v's input and o's (hidden wide); with every linear layer
    also gate/up's (hidden) and down's (intermediate)."""
    h, m = SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"]
    return 8 * layers * (2 * h * h if targets == "attention" else 3 * h * h + m * m)


def run_regmean(args) -> dict:
    """Every (targets, n, impl) of the grid, each in its own process, and the Qwen2-1.5B all-linear case within
    a 16 GB budget (the model's own memory included)."""
    cases = [("summed", "qwen2-0.5b", layers, targets, n, None) for targets, layers in REGMEAN_GRID for n in REGMEAN_NS]
    cases += [("per-task", "qwen2-0.5b", layers, targets, n, None) for targets, layers in REGMEAN_GRID
              for n in REGMEAN_NS if n * regmean_gram_bytes("qwen2-0.5b", layers, targets) <= PER_TASK_FITS]
    cases.append(("summed", "qwen2-1.5b", 28, "all-linear", 7, args.regmean_big_budget))
    out = []
    for impl, shape, layers, targets, n, memory in cases:
        cmd = [sys.executable, __file__, "--regmean-case", f"{impl},{shape},{layers},{targets},{n},{memory or ''}",
               "--device", args.device]
        print(f"== regmean {impl} {shape} {layers} layers {targets} n={n}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"regmean case failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(out[-1]), flush=True)
    return {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": commit(),
            "cases": out}


def write_regmean_report(results: dict, out: Path):
    """The table (per-task against summed, side by side per n) and the figure of memory against n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_write(out.with_suffix(".json"), lambda p: p.write_text(json.dumps(results, indent=2)))
    by = {(c["impl"], c["shape"], c["targets"], c["n"]): c for c in results["cases"]}
    gb = 1e9
    lines = [f"# RegMean's memory against the number of adapters ({results['device']}, torch {results['torch']}, "
             f"{results['threads']} threads)", "",
             f"Peak memory of one RegMean merge (alpha 0.9, {REGMEAN_ROWS} rows of {REGMEAN_TOKENS} tokens per "
             "adapter, random rank-8 adapters) beyond the model, adapters and rows already held, each case in a "
             "fresh process (peak RSS only grows); per-task: every adapter's Gram matrices held at once (the "
             "implementation before the summed statistics); summed: S = sum_i G_i, the diagonals and G_i A_i^T, "
             "collected while each adapter's rows run.", "",
             "| model (layers) | targets | n | per-task peak | summed peak | per-task / summed | per-task s | summed s |",
             "|---|---|---|---|---|---|---|---|"]
    for targets, layers in REGMEAN_GRID:
        for n in REGMEAN_NS:
            old, new = by.get(("per-task", "qwen2-0.5b", targets, n)), by[("summed", "qwen2-0.5b", targets, n)]
            peak = new["peak_beyond_model_bytes"]
            old_peak = (f"{old['peak_beyond_model_bytes'] / gb:.2f} GB" if old else
                        f"not run: its Grams alone {n * regmean_gram_bytes('qwen2-0.5b', layers, targets) / gb:.1f} GB")
            ratio = f"{old['peak_beyond_model_bytes'] / peak:.1f}x" if old else "n/a"
            old_s = f"{old['seconds']:.1f}" if old else "n/a"
            lines.append(f"| Qwen2-0.5B ({layers}) | {targets} | {n} | {old_peak} | {peak / gb:.2f} GB | {ratio} | "
                         f"{old_s} | {new['seconds']:.1f} |")
    big = by.get(("summed", "qwen2-1.5b", "all-linear", 7))
    if big:
        total = big["model_bytes"] + big["peak_beyond_model_bytes"]
        lines += ["", f"Qwen2-1.5B shape, all 28 layers, all-linear targets, 7 adapters, summed statistics in "
                      f"{big['passes']} passes" + (f" (budget --memory {big['memory_gb']:g} GB" if big.get("memory_gb")
                                                   else " (") +
                      f"; {big.get('threads', results['threads'])} threads, commit {big.get('commit', results['commit'])}"
                      f"): model {big['model_bytes'] / gb:.2f} GB (RSS before the merge), peak "
                      f"{total / gb:.2f} GB in all ({total / 2 ** 30:.2f} GiB), {big['seconds']:.0f} s."]
    for targets, layers in REGMEAN_GRID:
        new = [by[("summed", "qwen2-0.5b", targets, n)]["peak_beyond_model_bytes"] for n in REGMEAN_NS]
        lines += ["", f"{targets}: summed peak at n = 14 is {new[-1] / new[0]:.3f} of n = 2's."]
    atomic_write(out.with_suffix(".md"), lambda p: p.write_text("\n".join(lines) + "\n"))
    fig, axes = plt.subplots(1, len(REGMEAN_GRID), figsize=(10, 3.8))
    for ax, (targets, layers) in zip(axes, REGMEAN_GRID):
        for impl, style in (("per-task", "o-"), ("summed", "s-")):
            ns = [n for n in REGMEAN_NS if (impl, "qwen2-0.5b", targets, n) in by]
            ax.plot(ns, [by[(impl, "qwen2-0.5b", targets, n)]["peak_beyond_model_bytes"] / gb for n in ns], style,
                    label=impl)
        ax.set(title=f"Qwen2-0.5B shape, {layers} layers, {targets}", xlabel="adapters merged (n)",
               ylabel="peak memory beyond the model (GB)", xticks=list(REGMEAN_NS))
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    figure = REPO / "results" / "figures" / "regmean_memory.png"
    fig.savefig(figure, dpi=120)


CASES = {
    "svd-smollm2-135m": ("SVD merge, SmolLM2-135M shapes: ours vs PEFT svd", lambda a: case_merge("svd", "smollm2", a.reps)),
    "svd-qwen2-1.5b": ("SVD merge, Qwen2-1.5B shapes: ours vs PEFT svd", lambda a: case_merge("svd", "qwen2-1.5b", min(a.reps, 3))),
    "concat-qwen2-1.5b": ("concat, Qwen2-1.5B shapes: ours vs PEFT cat", lambda a: case_merge("concat", "qwen2-1.5b", a.reps)),
    "weight_sum-qwen2-1.5b": ("weight_sum, Qwen2-1.5B shapes: ours vs PEFT linear", lambda a: case_merge("weight_sum", "qwen2-1.5b", a.reps)),
    **{f"{m}{'_svd' if f else ''}-qwen2-1.5b": (
        f"{m}{' rank 8' if f else ''} (core), Qwen2-1.5B shapes: ours vs PEFT {PEFT_NAMES[m]}{'_svd' if f else ''}",
        lambda a, m=m, f=f: case_merge(m, "qwen2-1.5b", min(a.reps, 2) if f else a.reps, svd_form=f))
       for m in ("ties", "dare_linear", "dare_ties", "magnitude_prune") for f in (False, True)},
    **{f"{m}-core-vs-dense": (f"{m}: core space vs our dense form, SmolLM2-135M shapes",
                              lambda a, m=m: case_core_vs_dense(m, a.reps))
       for m in ("task_arithmetic", "tsv_m", "iso_c", "iso_cts", "knots_ties", "ties")},
    "train-same-loss": ("training step, same loss: ours vs PEFT LoRA", lambda a: case_train("same", a.device, a.dtype, a.reps)),
    "train-as-shipped": ("training step as shipped: ours vs PEFT + HF loss", lambda a: case_train("as-shipped", a.device, a.dtype, a.reps)),
    "train-padded": ("training forward+backward, 21% padding: padded tokens skipped vs computed", lambda a: case_train_padded(a.device, a.dtype, a.reps)),
    "folded-vs-base": ("inference: SVD merge folded into W vs base model", lambda a: case_inference("folded-vs-base", a.device, a.dtype, a.reps)),
    "concat-unfolded": ("inference: concat unfolded (7 adapters live) vs folded", lambda a: case_inference("concat-unfolded", a.device, a.dtype, a.reps)),
    "moa-vs-single": ("inference: MoA batched vs single LoRA batched", lambda a: case_inference("moa-vs-single", a.device, a.dtype, a.reps)),
    "moa-gathered-vs-masked": ("inference: MoA, routed factors gathered vs all adapters masked", lambda a: case_inference("moa-gathered-vs-masked", a.device, a.dtype, a.reps)),
    "moa-batched-vs-bs1": ("inference: MoA batched vs MoA batch size 1", lambda a: case_inference("moa-batched-vs-bs1", a.device, a.dtype, a.reps)),
    "arrow-vs-single": ("inference: Arrow batched vs single LoRA batched", lambda a: case_inference("arrow-vs-single", a.device, a.dtype, a.reps)),
    "eval-throughput": ("evaluation, one task: batched vs one row at a time", lambda a: case_eval(a.device, a.dtype, a.reps)),
}

TARGETS = {  # the goals of the benchmark issue, as (minimum ratio, what it means)
    "svd-qwen2-1.5b": (100.0, "at least 100x faster than PEFT's svd"),
    "train-same-loss": (1.0, "at least as fast as PEFT"),
    "folded-vs-base": (0.97, "within 3% of the base model"),
    "moa-vs-single": (0.97, "at least 0.97x single-LoRA throughput"),
    "moa-batched-vs-bs1": (3.0, "several times MoA at batch size 1"),
}


def commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def run_all(args) -> dict:
    results = {"device": args.device, "dtype": str(args.dtype), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "cases": {}}
    previous = Path(args.out).with_suffix(".json")
    if args.keep and previous.exists():   # the rows not rerun now stay, each with the commit it was measured at
        old = json.loads(previous.read_text())
        if (old["device"], old["dtype"]) != (results["device"], results["dtype"]):
            raise SystemExit(f"--keep: {previous} was measured on {old['device']} {old['dtype']}; drop --keep")
        results["cases"] = {k: v for k, v in old["cases"].items() if k not in args.cases and k in CASES}
    head = commit()
    for name in args.cases:
        cmd = [sys.executable, __file__, "--case", name, "--reps", str(args.reps), "--device", args.device]
        print(f"== {name}: {CASES[name][0]}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"case {name} failed:\n{proc.stderr[-3000:]}")
        results["cases"][name] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "commit": head}
        print(json.dumps(results["cases"][name]), flush=True)
    return results


def write_report(results: dict, out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".json"), lambda p: p.write_text(json.dumps(results, indent=2)))
    lines = [f"# Benchmarks ({results['device']}, {results['dtype']}, torch {results['torch']}, "
             f"{results['threads']} threads)", "",
             "ratio = reference time / our time (above 1: ours faster); medians of alternating runs.", "",
             "| case | what | ratio | target | met | notes |", "|---|---|---|---|---|---|"]
    commits = {r.get("commit", "unknown") for r in results["cases"].values()}
    for name in [c for c in CASES if c in results["cases"]]:
        r = results["cases"][name]
        target = TARGETS.get(name)
        met = "" if target is None else ("yes" if r["ratio"] >= target[0] else "**no**")
        notes = []
        if "max_rel_frobenius_diff" in r:
            notes.append(f"max rel. Frobenius diff {r['max_rel_frobenius_diff']:.1e} over {r['modules']} modules")
        if "peft_one_adapter_rel_diff" in r:
            notes.append(f"PEFT {r['peft_combination']} gives one adapter back to {r['peft_one_adapter_rel_diff']:.0e}")
        if "peft_vs_our_dense_rel_diff" in r:
            notes.append(f"PEFT vs our dense form (same math): {r['peft_vs_our_dense_rel_diff']:.1e} over "
                         f"{r['dense_modules']} modules")
        if r.get("exact"):
            notes.append(f"core vs dense: {r['exact']}")
        if "max_rel_diff_vs_dense_float64" in r:
            d = r["max_rel_diff_vs_dense_float64"]
            notes.append(f"vs a dense float64 SVD: ours {d['ours']:.1e}, PEFT {d['peft']:.1e}")
        if "bitwise_equal_gradients" in r:
            notes.append(f"{r['padding']:.0%} padding; gradients bitwise {'equal' if r['bitwise_equal_gradients'] else 'different'}")
        if "ours_tokens_per_s" in r:
            notes.append(f"{r['ours_tokens_per_s']:.0f} vs {r['reference_tokens_per_s']:.0f} tokens/s")
        if "ours_rows_per_s" in r:
            notes.append(f"{r['ours_rows_per_s']:.2f} vs {r['reference_rows_per_s']:.2f} rows/s")
        if "note" in r:
            notes.append(r["note"])
        if len(commits) > 1:
            notes.append(f"measured at commit {r.get('commit', 'unknown')}")
        lines.append(f"| {name} | {CASES[name][0]} | {r['ratio']:.2f} | {target[1] if target else ''} | {met} | "
                     f"{'; '.join(notes)} |")
    atomic_write(out.with_suffix(".md"), lambda p: p.write_text("\n".join(lines) + "\n"))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=list(CASES), help="run one case in this process and print its JSON")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated cases for the full run")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(REPO / "results" / "bench"), help="report path without suffix")
    p.add_argument("--regmean", action="store_true",
                   help="RegMean's memory against the number of adapters (results/bench-regmean.{json,md})")
    p.add_argument("--regmean-case", default=None, metavar="IMPL,SHAPE,LAYERS,TARGETS,N,MEMORY",
                   help="one RegMean memory case in this process, printed as JSON")
    p.add_argument("--regmean-precision", action="store_true",
                   help="what float32 Gram products would change in RegMean on the embedded model, printed as JSON")
    p.add_argument("--regmean-big-budget", type=float, default=9.0,
                   help="GB for the Qwen2-1.5B case's statistics, the solve and the folded weights' copy (its model "
                        "took 7.1 GB of RSS; 9.0 gave a peak of 15.82 GB in all, 10 passes)")
    p.add_argument("--keep", action="store_true",
                   help="keep the existing report's rows of the cases not in --cases (each row names its commit)")
    args = p.parse_args()
    args.dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.case:
        print(json.dumps(CASES[args.case][1](args)))
        return
    if args.regmean_case:
        impl, shape, layers, targets, n, memory = args.regmean_case.split(",")
        print(json.dumps(regmean_memory_case(impl, shape, int(layers), targets, int(n), args.device,
                                             float(memory) if memory else None)))
        return
    if args.regmean_precision:
        print(json.dumps(regmean_precision()))
        return
    if args.regmean:
        out = Path(args.out).with_name("bench-regmean")
        write_regmean_report(run_regmean(args), out)
        print(out.with_suffix(".md").read_text())
        return
    args.cases = [c.strip() for c in args.cases.split(",")]
    write_report(run_all(args), Path(args.out))
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
