"""src/lora.py against independent references: dense float64 formulas and PEFT (the merges: tests/test_merges.py)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from conftest import tiny_qwen2
from src import arrow, control, peft_files
from src import lora
from src import merges
from src.errors import BadInput


def random_lora(d_in, d_out, r, scale, gen, dtype=torch.float64):
    return lora.Lora(torch.randn(r, d_in, generator=gen, dtype=dtype), torch.randn(d_out, r, generator=gen, dtype=dtype), scale)


def random_adapter(model, r, alpha, gen, std=0.05) -> lora.Adapter:
    """An adapter with non-zero A and B for every LoRA layer of `model` (B nonzero, unlike a fresh init)."""
    modules = {}
    for name, layer in lora.lora_layers(model).items():
        A = torch.randn(r, layer.base.in_features, generator=gen) * std
        B = torch.randn(layer.base.out_features, r, generator=gen) * std
        modules[name] = lora.Lora(A, B, alpha / r)
    return lora.Adapter(modules, "tiny")


def ids(n=2, t=12, seed=0):
    return torch.randint(3, 1000, (n, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ the layer
def test_layer_matches_dense_formula_per_sample_gate():
    gen = torch.Generator().manual_seed(1)
    base = nn.Linear(24, 16).double()
    layer = lora.LoraLinear(base)
    loras = [random_lora(24, 16, r, s, gen) for r, s in [(2, 1.0), (5, 0.5), (3, 2.0)]]
    for lo in loras:
        layer.add(lo.A, lo.B, lo.scale, trainable=False)
    x = torch.randn(4, 7, 24, generator=gen, dtype=torch.float64)
    g = torch.rand(4, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        layer.gate = g
        got = layer(x)
        want = base(x) + sum(g[:, i, None, None] * (x @ (lo.scale * lo.B @ lo.A).T) for i, lo in enumerate(loras))
        assert torch.allclose(got, want, atol=1e-12)
        layer.gate = None  # all adapters with weight 1: concatenation
        assert torch.allclose(layer(x[0]), base(x[0]) + sum(x[0] @ lo.delta().T for lo in loras), atol=1e-12)


def test_init_is_kaiming_a_and_zero_b_and_only_adapters_get_gradients(tiny_model):
    x = ids()
    before = tiny_model(x).logits
    lora.inject(tiny_model)
    lora.add_adapter(tiny_model, r=8, alpha=16, trainable=True)
    layer = lora.lora_layers(tiny_model)["model.layers.0.self_attn.q_proj"]
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert layer.A[0].abs().max() <= bound and layer.A[0].abs().max() > 0.5 * bound
    assert torch.equal(layer.B[0], torch.zeros_like(layer.B[0])) and layer.scales == [2.0]
    assert torch.allclose(tiny_model(x).logits, before, atol=1e-6)
    tiny_model(x).logits.sum().backward()
    trained = {n for n, p in tiny_model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in tiny_model.named_parameters() if ".A." in n or ".B." in n}
    assert len(trained) == 2 * 4 * 2  # A and B, 4 targets, 2 layers
    assert layer.B[0].grad.abs().sum() > 0


def test_inject_bad_targets_lists_candidates_and_remove_restores(tiny_model):
    x = ids()
    before = tiny_model(x).logits
    originals = {n: m for n, m in tiny_model.named_modules() if isinstance(m, nn.Linear)}
    with pytest.raises(ValueError, match="match no Linear.*candidates: .*down_proj.*q_proj"):
        lora.inject(tiny_model, targets=("q_proj", "query"))
    assert not lora.lora_layers(tiny_model)  # nothing half-applied
    names = lora.inject(tiny_model, targets=lora.ORIGINAL_CODE_TARGETS)
    assert len(names) == 12 and not any("o_proj" in n for n in names)
    lora.add_adapter(tiny_model, random_adapter(tiny_model, 4, 8, torch.Generator().manual_seed(0)))
    assert not torch.allclose(tiny_model(x).logits, before)
    lora.remove(tiny_model)
    assert {n: m for n, m in tiny_model.named_modules() if isinstance(m, nn.Linear)} == originals
    assert torch.equal(tiny_model(x).logits, before)


def test_one_hot_gate_is_that_adapter_alone_and_concat_is_all_at_once():
    gen = torch.Generator().manual_seed(2)
    x = ids(3)
    multi = tiny_qwen2()
    lora.inject(multi)
    adapters = [random_adapter(multi, r, 2 * r, gen) for r in (2, 4, 8)]
    for a in adapters:
        lora.add_adapter(multi, a)
    alone = tiny_qwen2()
    lora.inject(alone)
    lora.add_adapter(alone, adapters[1])
    with torch.no_grad(), lora.gated(multi, torch.tensor([0.0, 1.0, 0.0])):
        assert torch.allclose(multi(x).logits, alone(x).logits, atol=1e-5)
    merged = tiny_qwen2()
    lora.inject(merged)
    lora.add_adapter(merged, merges.merge(adapters, "concat"))
    with torch.no_grad():
        all_at_once = multi(x).logits  # gate None: every adapter with weight 1
        assert torch.allclose(merged(x).logits, all_at_once, atol=1e-5)
        assert not torch.allclose(alone(x).logits, all_at_once, atol=1e-3)


# --------------------------------------------------------------------------------------------------- folding
def test_folded_matches_unfolded_and_restores_w_exactly(tiny_model):
    gen = torch.Generator().manual_seed(7)
    x = ids()
    lora.inject(tiny_model)
    adapter = random_adapter(tiny_model, 8, 16, gen)
    weights = {n: m.base.weight.clone() for n, m in lora.lora_layers(tiny_model).items()}
    lora.add_adapter(tiny_model, adapter)
    with torch.no_grad():
        want = tiny_model(x).logits
        with lora.gated(tiny_model, torch.zeros(1)), lora.folded(tiny_model, adapter):  # adapter off, folded into W
            assert torch.allclose(tiny_model(x).logits, want, atol=1e-5)
            assert not torch.equal(lora.lora_layers(tiny_model)["model.layers.0.self_attn.q_proj"].base.weight,
                                   weights["model.layers.0.self_attn.q_proj"])
    for n, m in lora.lora_layers(tiny_model).items():
        assert torch.equal(m.base.weight, weights[n])
    bad = lora.Adapter({"model.layers.0.self_attn.q_proj": random_lora(32, 64, 2, 1.0, gen, torch.float32)})
    with pytest.raises(ValueError, match="cannot fold into model.layers.0.self_attn.q_proj"):
        with lora.folded(tiny_model, bad):
            pass


# ---------------------------------------------------------------------------------------------- PEFT format
def test_our_adapter_loads_in_peft_with_same_logits(tmp_path):
    from peft import PeftModel

    gen = torch.Generator().manual_seed(8)
    x = ids()
    ours = tiny_qwen2()
    lora.inject(ours)
    adapter = random_adapter(ours, 8, 16, gen)
    adapter.modules["model.layers.1.self_attn.v_proj"] = random_lora(64, 32, 4, 0.5, gen, torch.float32)  # rank 4
    lora.add_adapter(ours, adapter)
    peft_files.save_adapter(adapter, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["rank_pattern"] == {"model.layers.1.self_attn.v_proj": 4}
    peft_model = PeftModel.from_pretrained(tiny_qwen2(), tmp_path / "a").eval()
    with torch.no_grad():
        assert (peft_model(x).logits - ours(x).logits).abs().max() <= 1e-5
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))


def test_peft_trained_adapter_loads_in_ours_with_same_logits(tmp_path):
    from peft import LoraConfig, get_peft_model

    x = ids()
    peft_model = get_peft_model(tiny_qwen2(), LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(9)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)  # as if trained: B is no longer zero
    peft_model.eval().save_pretrained(tmp_path / "p")
    adapter = peft_files.load_adapter(tmp_path / "p")
    assert len(adapter.modules) == 6 and {lo.scale for lo in adapter.modules.values()} == {3.0}
    ours = tiny_qwen2()
    lora.inject(ours, targets=("q_proj", "v_proj", "down_proj"))
    lora.add_adapter(ours, adapter)
    with torch.no_grad():
        assert (peft_model(x).logits - ours(x).logits).abs().max() <= 1e-5


def test_load_errors_are_clear(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="missing adapter file .*create it with `python train.py`"):
        peft_files.load_adapter(tmp_path / "none", hint="python train.py")
    lora.inject(tiny_model)
    adapter = random_adapter(tiny_model, 4, 8, torch.Generator().manual_seed(0))
    peft_files.save_adapter(adapter, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt adapter"):
        peft_files.load_adapter(tmp_path / "a")
    other = tiny_qwen2(hidden=32)
    lora.inject(other)
    with pytest.raises(ValueError, match=r"does not fit module model.layers.0.self_attn.q_proj: A \(4, 64\)"):
        lora.add_adapter(other, adapter)
    assert all(len(m.A) == 0 for m in lora.lora_layers(other).values())  # nothing half-applied
    lora.remove(other)
    lora.inject(other, targets=("q_proj",))
    with pytest.raises(ValueError, match="adapter modules do not match"):
        lora.add_adapter(other, adapter)


# ---------------------------------------------------------------------------------------------------------- MoA
def task_prompts(task: int, n: int, t: int, gen) -> torch.Tensor:
    """Synthetic prompts like the real ones: random content, then a cue of tokens that names the task
    (as `### Sentiment:` does), so the last position tells the tasks apart."""
    cue = torch.tensor([900 + 10 * task, 901 + 10 * task, 902 + 10 * task])
    return torch.cat([torch.randint(3, 800, (n, t - len(cue)), generator=gen), cue.expand(n, -1)], dim=1)


def test_moa_router_learns_tasks_and_routes_each_sample_on_its_own(tmp_path):
    gen = torch.Generator().manual_seed(10)
    torch.manual_seed(10)
    model = tiny_qwen2()
    lora.inject(model)
    adapters = [random_adapter(model, 4, 8, gen, std=0.2) for _ in range(3)]
    for name, a in zip("abc", adapters):
        lora.add_adapter(model, a, name=name)
    routers = lora.make_routers(model, 3)
    lora.attach_routers(model, routers)
    opt = torch.optim.AdamW(routers.parameters(), lr=1e-2)
    for step in range(200):
        labels = torch.randint(0, 3, (8,), generator=gen)
        x = torch.cat([task_prompts(int(k), 1, 10, gen) for k in labels])
        feats, where = lora.router_inputs(model, x, torch.ones_like(x), labels)
        assert [f.shape for f in feats] == [(8, 64)] * (2 * 2) and where == [0, 0, 0, 1, 2, 2, 2, 3]  # q/k/v: one input
        loss, _ = lora.router_loss(routers, feats, where, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # held-out prompts, routed for real inside the model
    labels = torch.arange(3).repeat(20)
    x = torch.cat([task_prompts(int(k), 1, 10, gen) for k in labels])
    with torch.no_grad(), lora.routing(model):
        mixed = model(x).logits
        decisions = lora.route_decisions(model)
    assert decisions.shape == (60, 8)
    assert (decisions == labels[:, None]).float().mean() >= 0.95
    with torch.no_grad():
        for i in range(0, 60, 7):  # each sample alone gives the same outputs as inside the mixed batch
            with lora.routing(model):
                alone = model(x[i:i + 1]).logits
                assert torch.equal(lora.route_decisions(model)[0], decisions[i])
            assert (alone[0] - mixed[i]).abs().max() <= 1e-5
    # routes chosen at the prompt are kept while generating
    with torch.no_grad(), lora.routing(model):
        out = model.generate(x[:6], attention_mask=torch.ones_like(x[:6]), max_new_tokens=4, do_sample=False)
        assert torch.equal(lora.route_decisions(model), decisions[:6])
    assert out.shape == (6, 14)
    lora.save_routers(model, tmp_path / "moa", ["a", "b", "c"], "tiny")
    fresh = tiny_qwen2()
    lora.inject(fresh)
    for name, a in zip("abc", adapters):
        lora.add_adapter(fresh, a, name=name)
    with pytest.raises(ValueError, match=r"trained for tasks \['a', 'b', 'c'\], not \['a', 'c', 'd'\]: train them"):
        lora.load_routers(fresh, tmp_path / "moa", ["a", "c", "d"])
    lora.load_routers(fresh, tmp_path / "moa", ["a", "b", "c"])
    with torch.no_grad(), lora.routing(fresh):
        assert torch.allclose(fresh(x).logits, mixed, atol=1e-6)
    narrow = tiny_qwen2(hidden=32)  # the same layer names, another width: one line, not a copy_ error
    lora.inject(narrow)
    for name in "abc":
        lora.add_adapter(narrow, random_adapter(narrow, 2, 4, torch.Generator().manual_seed(3)), name=name)
    with pytest.raises(ValueError, match=r"do not fit layer model.layers.0.self_attn.q_proj \(router weight \(3, 64\), "
                                         r"the layer needs \(3, 32\)\)"):
        lora.load_routers(narrow, tmp_path / "moa", ["a", "b", "c"])


def test_moa_on_attention_and_mlp_targets_reads_each_layers_own_width(tmp_path):
    """The original code's targets: down_proj reads the MLP's hidden state (intermediate_size wide), every other
    target hidden_size. Each layer's router reads its own layer's input: routers, teacher-forced features and loss
    come in both widths, and saved then loaded routers route exactly as before."""
    gen = torch.Generator().manual_seed(11)
    model = tiny_qwen2()  # hidden 64, intermediate 128
    lora.inject(model, targets=lora.ORIGINAL_CODE_TARGETS)
    adapters = [random_adapter(model, 4, 8, gen, std=0.2) for _ in range(3)]
    for name, a in zip("abc", adapters):
        lora.add_adapter(model, a, name=name)
    widths = [layer.base.in_features for layer in lora.lora_layers(model).values()]
    assert widths == ([64] * 5 + [128]) * 2  # q, k, v, gate, up, down per decoder layer
    routers = lora.make_routers(model, 3, generator=gen)
    assert [(r.in_features, r.out_features) for r in routers] == [(w, 3) for w in widths]

    labels = torch.tensor([0, 1, 2, 1])
    x = torch.cat([task_prompts(int(k), 1, 10, gen) for k in labels])
    feats, where = lora.router_inputs(model, x, torch.ones_like(x), labels)
    assert where == [0, 0, 0, 1, 1, 2, 3, 3, 3, 4, 4, 5]  # q, k, v share one input, gate and up another
    assert [f.shape for f in feats] == [(4, 64), (4, 64), (4, 128)] * 2
    mlp = model.model.layers[1].mlp  # down_proj's feature is act(gate(x)) * up(x) of gate/up's, gold adapter active
    with torch.no_grad(), lora.gated(model, F.one_hot(labels, 3).float()):
        assert torch.allclose(feats[5], mlp.act_fn(mlp.gate_proj(feats[4])) * mlp.up_proj(feats[4]), atol=1e-6)
    loss, predicted = lora.router_loss(routers, feats, where, labels)
    reference = torch.stack([F.cross_entropy(r(feats[u]), labels) for r, u in zip(routers, where)]).mean()
    assert torch.allclose(loss, reference) and predicted.shape == (12, 4)
    loss.backward()
    assert all(r.weight.grad.abs().sum() > 0 for r in routers)

    lora.attach_routers(model, routers)
    with torch.no_grad(), lora.routing(model):
        logits = model(x).logits
        decisions = lora.route_decisions(model)
    assert decisions.shape == (4, 12)
    lora.save_routers(model, tmp_path / "moa", ["a", "b", "c"], "tiny")
    saved = load_file(str(tmp_path / "moa" / "routers.safetensors"))
    assert saved["model.layers.0.mlp.down_proj.router.weight"].shape == (3, 128)
    assert saved["model.layers.0.mlp.up_proj.router.weight"].shape == (3, 64)
    fresh = tiny_qwen2()
    lora.inject(fresh, targets=lora.ORIGINAL_CODE_TARGETS)
    for name, a in zip("abc", adapters):
        lora.add_adapter(fresh, a, name=name)
    lora.load_routers(fresh, tmp_path / "moa", ["a", "b", "c"])
    with torch.no_grad(), lora.routing(fresh):
        assert torch.equal(fresh(x).logits, logits)
    # adapters are addressed by name: held in another order, the routers' logits follow them and route alike
    shuffled = tiny_qwen2()
    lora.inject(shuffled, targets=lora.ORIGINAL_CODE_TARGETS)
    for k in (2, 0, 1):
        lora.add_adapter(shuffled, adapters[k], name="abc"[k])
    lora.load_routers(shuffled, tmp_path / "moa", ["a", "b", "c"])
    with torch.no_grad(), lora.routing(shuffled):
        assert torch.allclose(shuffled(x).logits, logits, rtol=1e-5, atol=1e-6)
        names = lora.adapter_names(shuffled)
        routed = [[names[i] for i in row] for row in lora.route_decisions(shuffled).tolist()]
    with torch.no_grad(), lora.routing(fresh):
        fresh(x)
        assert routed == [["abc"[i] for i in row] for row in lora.route_decisions(fresh).tolist()]
        assert torch.equal(lora.route_decisions(fresh), decisions)


def test_moa_routed_sample_is_its_own_adapters_folded_into_w_in_float64():
    """MoA with unequal ranks (3, 5, 2) gathers each sample's routed factors: its logits and greedy tokens are those
    of the base model with, in every layer, W + s_k B_k A_k added densely for the adapter k that layer chose for that
    sample (float64, one sample at a time)."""
    gen = torch.Generator().manual_seed(5)
    model = tiny_qwen2().double()
    lora.inject(model)
    adapters = [random_adapter(model, r, 8, gen, std=0.2) for r in (3, 5, 2)]
    for a in adapters:
        lora.add_adapter(model, a)
    routers = lora.make_routers(model, 3, generator=gen).double()
    lora.attach_routers(model, routers)
    x = ids(n=6, t=9, seed=4)
    with torch.no_grad(), lora.routing(model):
        logits = model(x).logits
        decisions = lora.route_decisions(model)
    with torch.no_grad(), lora.routing(model):
        tokens = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False)
    assert len(decisions.unique()) == 3  # every adapter is somebody's route
    names = list(lora.lora_layers(model))
    for b in range(x.shape[0]):
        dense = tiny_qwen2().double()
        with torch.no_grad():
            for name, k in zip(names, decisions[b].tolist()):
                part = adapters[k].modules[name]
                dense.get_submodule(name).weight += part.scale * part.B.double() @ part.A.double()
            assert (dense(x[b:b + 1]).logits[0] - logits[b]).abs().max() <= 1e-10
            alone = dense.generate(x[b:b + 1], attention_mask=torch.ones_like(x[b:b + 1]), max_new_tokens=5,
                                   do_sample=False)
        assert torch.equal(alone[0], tokens[b])


def test_the_cached_stacks_are_the_factors_and_follow_one_changed_in_place():
    """`stacked` and `padded` are kept between inference calls: they equal the raw factors (padded: A_i^T and
    (s_i B_i)^T, zeros past rank r_i), the same objects come back while nothing changes, and an in-place update of
    one factor rebuilds both."""
    gen = torch.Generator().manual_seed(3)
    layer = lora.LoraLinear(nn.Linear(7, 5).double())
    parts = [random_lora(7, 5, r, s, gen) for r, s in [(2, 0.5), (3, 4.0)]]
    for part in parts:
        layer.add(part.A, part.B, part.scale, trainable=False)

    def check():
        A, B = layer.stacked()
        A_t, B_t = layer.padded()
        assert torch.equal(A, torch.cat([layer.A[0], layer.A[1]])) and torch.equal(B, torch.cat([layer.B[0], layer.B[1]], 1))
        for i, (a, b, s) in enumerate(zip(layer.A, layer.B, layer.scales)):
            r = a.shape[0]
            assert torch.equal(A_t[i, :, :r], a.T) and not A_t[i, :, r:].any()
            assert torch.allclose(B_t[i, :r], s * b.T, rtol=0, atol=0) and not B_t[i, r:].any()
        return A, A_t

    with torch.no_grad():
        first = check()
        again = check()
        assert first[0] is again[0] and first[1] is again[1]  # kept
        layer.A[1].mul_(-2.0)
        changed = check()
        assert changed[0] is not first[0] and changed[1] is not first[1]
        layer.B[0].add_(1.0)
        check()
        layer.scales[1] = 0.25
        check()
    with torch.enable_grad():  # under autograd nothing is kept: the gradient reaches the factors
        layer.A[0].requires_grad_(True)
        layer.padded()[0].sum().backward()
        assert torch.equal(layer.A[0].grad, torch.ones_like(layer.A[0]))


def test_random_like_keeps_each_modules_norms_ranks_and_scales_and_nothing_else():
    """The control's random LoRAs: every module's ||A|| and ||s B A|| (dense, float64) equal the trained adapter's,
    ranks and scales too; the directions are unrelated (update cosine near 0) and fixed by the generator."""
    gen = torch.Generator().manual_seed(8)
    trained = lora.Adapter({f"m{i}.q_proj": random_lora(40 + i, 30, r, s, gen)
                            for i, (r, s) in enumerate([(3, 2.0), (5, 0.5), (2, 4.0)])}, "tiny")
    noise = control.random_like(trained, torch.Generator().manual_seed(1))
    assert control.random_like(trained, torch.Generator().manual_seed(1)).modules["m0.q_proj"].A.equal(
        noise.modules["m0.q_proj"].A)
    for name, t in trained.modules.items():
        n = noise.modules[name]
        assert (n.A.shape, n.B.shape, n.scale) == (t.A.shape, t.B.shape, t.scale)
        dense_t, dense_n = t.scale * t.B @ t.A, n.scale * n.B @ n.A
        assert abs(n.A.norm() / t.A.norm() - 1) <= 1e-12 and abs(dense_n.norm() / dense_t.norm() - 1) <= 1e-12
        assert abs((dense_n * dense_t).sum() / (dense_n.norm() * dense_t.norm())) < 0.3


# -------------------------------------------------------------------------------------------------------- Arrow
def test_arrow_prototypes_and_gates_against_a_dense_reference():
    """Unequal ranks (3, 5, 2): the prototypes are numpy's top right singular vectors of the dense s_i B_i A_i (up
    to sign), and the layer's output is W x + sum_i g_i(x) s_i B_i A_i x with g written here from its definition
    (top-k of |x . v_i|, softmax over those at the temperature), token by token, in float64."""
    import numpy as np

    gen = torch.Generator().manual_seed(21)
    d_in, d_out, ranks, scales = 12, 9, (3, 5, 2), (2.0, 0.5, 1.5)
    loras = [random_lora(d_in, d_out, r, s, gen) for r, s in zip(ranks, scales)]
    dense = [(f.scale * f.B @ f.A).numpy() for f in loras]
    protos = arrow.arrow_prototypes([f.A for f in loras], [f.B for f in loras]).numpy()
    for v, d in zip(protos, dense):
        top = np.linalg.svd(d)[2][0]
        assert min(np.abs(v - top).max(), np.abs(v + top).max()) < 1e-10
    layer = lora.LoraLinear(nn.Linear(d_in, d_out).double())
    for f in loras:
        layer.add(f.A, f.B, f.scale, trainable=False)
    x = torch.randn(2, 5, d_in, generator=gen, dtype=torch.float64)
    W, b = layer.base.weight.detach().numpy(), layer.base.bias.detach().numpy()
    for top_k, temperature in ((1, 1.0), (2, 0.3), (3, 4.0)):
        layer.arrow = arrow.Arrow(torch.tensor(protos), top_k, temperature)
        with torch.no_grad():
            got = layer(x).numpy()
        for token, out in zip(x.reshape(-1, d_in).numpy(), got.reshape(-1, d_out)):
            scores = np.abs(protos @ token)
            keep = np.argsort(-scores)[:top_k]
            g = np.zeros(len(loras))
            g[keep] = np.exp((scores[keep] - scores[keep].max()) / temperature)
            g /= g.sum()
            want = W @ token + b + sum(gi * d @ token for gi, d in zip(g, dense))
            assert np.abs(out - want).max() < 1e-10 * max(1.0, np.abs(want).max())


def test_arrow_gives_the_logits_of_peft_arrow_with_the_same_prototypes(tmp_path):
    """PEFT's create_arrow_model over the same three adapters (equal ranks: PEFT requires them), its prototypes set
    to ours (PEFT's come from 15 power iterations from a random start: on these adapters up to 0.23 from the exact
unit vectors in an entry, so they route some tokens differently), top_k 2, temperature 0.7: the logits of our
    LoraLinear with arrow_routing equal PEFT's. Both float32 models doing the same products in another order (ours
    stacks the adapters' ranks), so equal to float32 rounding: 1e-5 of the largest logit."""
    from peft import ArrowConfig, create_arrow_model

    gen = torch.Generator().manual_seed(22)
    ours = tiny_qwen2()
    lora.inject(ours)
    adapters = [random_adapter(ours, 4, 8, gen, std=0.3) for _ in range(3)]
    for i, a in enumerate(adapters):
        lora.add_adapter(ours, a)
        peft_files.save_adapter(a, tmp_path / f"a{i}")
    peft_model = create_arrow_model(tiny_qwen2(), [str(tmp_path / f"a{i}") for i in range(3)],
                                    ArrowConfig(top_k=2, router_temperature=0.7)).eval()
    x = ids()
    with torch.no_grad():
        peft_model(x)  # builds PEFT's own prototypes, then ours replace them
        for name, layer in lora.lora_layers(ours).items():
            router = peft_model.base_model.model.get_submodule(name).lora_arrow["arrow_router"]
            router.prototypes = arrow.arrow_prototypes(layer.A, layer.B).float()
        want = peft_model(x).logits
        with arrow.arrow_routing(ours, top_k=2, temperature=0.7):
            got = ours(x).logits
        assert not torch.allclose(got, ours(x).logits)  # routing changed the output (outside: all adapters at 1)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_arrow_routing_refuses_what_it_cannot_use():
    model = tiny_qwen2()
    with pytest.raises(ValueError, match="Arrow routes between adapters"):
        with arrow.arrow_routing(model, 1, 1.0):
            pass
    lora.inject(model)
    lora.add_adapter(model, random_adapter(model, 2, 4, torch.Generator().manual_seed(1)))
    for top_k, temperature, message in ((0, 1.0, "top_k=0"), (True, 1.0, "top_k=True"), (1, 0.0, "temperature=0.0"),
                                        (1, float("nan"), "temperature=nan")):
        with pytest.raises(ValueError, match=message):
            with arrow.arrow_routing(model, top_k, temperature):
                pass
    assert all(layer.arrow is None for layer in lora.lora_layers(model).values())


def _minus_loss(heldout):
    """A score of routers on held-out synthetic features (higher is better), standing in for train_routers' real
    routing accuracy, which needs a model."""
    def score(routers) -> float:
        with torch.no_grad():
            loss, _ = lora.router_loss(routers, [f[heldout.rows] for f in heldout.features], heldout.where,
                                       heldout.labels)
        return -loss.item()
    return score


def test_router_epochs_chosen_on_held_out_prompts_keep_that_epochs_routers():
    """router_select "heldout": after each epoch the routers are scored on held-out prompts (`routed`) and the epoch
    of the best score is kept. Its routers are exactly those of a run stopped after that epoch (same seeded batch
    orders), and its logged score is the best of the epochs'. Training rows with half their labels shuffled make
    later epochs overfit, so the choice is not simply the last epoch."""
    from src.train import RouterRows, make_config, train_router_set

    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=gen)

    def prompts(n, noisy):
        labels = torch.arange(n) % 3
        x = centers[labels] + 1.5 * torch.randn(n, 16, generator=gen)
        if noisy:
            labels = torch.where(torch.arange(n) % 2 == 0, labels[torch.randperm(n, generator=gen)], labels)
        return RouterRows([x], [0, 0], torch.arange(n), labels)

    train, heldout = prompts(30, True), prompts(60, False)

    def routers():
        torch.manual_seed(1)
        return nn.ModuleList([nn.Linear(16, 3), nn.Linear(16, 3)])

    cfg = make_config("cpu", {"router_epochs": 40, "router_lr": 0.05, "router_batch_size": 4, "router_select": "heldout"})
    chosen = routers()
    log = train_router_set(cfg, train, chosen, "test", _minus_loss(heldout))
    epochs = [e for e in log if "routed" in e and "epoch" in e]
    assert len(epochs) == 40 and log[-1]["chosen_epoch"] < 39   # it overfits: the last epoch is not the best
    best = max(epochs, key=lambda e: e["routed"])
    assert log[-1] == {"chosen_epoch": best["epoch"], "routed": best["routed"]}
    assert _minus_loss(heldout)(chosen) == best["routed"]
    stopped = routers()
    train_router_set(make_config("cpu", {"router_epochs": best["epoch"] + 1, "router_lr": 0.05, "router_batch_size": 4}),
                     train, stopped, "test")
    for a, b in zip(chosen.parameters(), stopped.parameters()):
        assert torch.equal(a, b)


def test_router_rows_chosen_on_held_out_prompts_keep_that_counts_routers():
    """router_try_rows: routers trained on all router_rows prompts per task and on the first router_try_rows, the
    count whose chosen epoch scores higher kept (train_routers scores real routing; here minus a held-out loss), and
    its routers exactly those of a run given only that count. Two cases, so the choice follows the score and not
    the count: the later rows mislabelled (fewer rows win), and the first rows too few to separate the tasks (all
    rows win)."""
    from src.train import RouterRows, first_rows, make_config, train_router_rows, train_router_set

    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=gen)

    def prompts(n, noise, wrong_after=None):
        labels = torch.arange(n) % 3
        x = centers[labels] + noise * torch.randn(n, 16, generator=gen)
        if wrong_after is not None:   # the rows after the first `wrong_after` per task carry the next task's label
            rank = torch.arange(n) // 3
            labels = torch.where(rank >= wrong_after, (labels + 1) % 3, labels)
        order = torch.argsort(labels * n + torch.arange(n))   # grouped by task, as train_routers gives them
        return RouterRows([x[order]], [0, 0], torch.arange(n), labels[order])

    def routers():
        torch.manual_seed(1)
        return nn.ModuleList([nn.Linear(16, 3), nn.Linear(16, 3)])

    cfg = make_config("cpu", {"router_epochs": 15, "router_lr": 0.05, "router_batch_size": 4, "router_rows": 60,
                              "router_try_rows": 6})
    for train, fewer_wins in ((prompts(180, 1.0, wrong_after=6), True), (prompts(180, 4.0), False)):
        heldout = prompts(90, 1.0 if fewer_wins else 4.0)
        chosen, log, choice = train_router_rows(cfg, train, routers, "test", _minus_loss(heldout))
        assert [t["rows"] for t in choice["tried"]] == [60, 6]
        assert choice["rows"] == (6 if fewer_wins else 60)
        assert choice["rows"] == max(choice["tried"], key=lambda t: t["routed"])["rows"]
        alone = routers()
        alone_log = train_router_set(cfg, first_rows(train, choice["rows"]), alone, "test", _minus_loss(heldout))
        assert log == alone_log and log[-1] == {k: v for k, v in choice["tried"][
            [t["rows"] for t in choice["tried"]].index(choice["rows"])].items() if k != "rows"}
        for a, b in zip(chosen.parameters(), alone.parameters()):
            assert torch.equal(a, b)
    assert len(first_rows(train, 6).labels) == 18 and first_rows(train, 6).rows.tolist() == [
        i for k in range(3) for i in range(60 * k, 60 * k + 6)]
    assert train_router_rows(make_config("cpu", {"router_try_rows": 0}), train, routers, "test")[2] is None


def test_router_choice_ties_keep_the_earlier_epoch_and_router_rows():
    """Held-out routing accuracy is a count over prompts, so epochs and counts tie: ties keep the earlier epoch and
    router_rows (all the rows), as documented. With a score that never changes, that is epoch 0 of the full count,
    and its routers are those of a one-epoch run on all the rows."""
    from src.train import RouterRows, make_config, train_router_rows, train_router_set

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(24) // 8   # 8 prompts per task, grouped by task as train_routers gives them
    train = RouterRows([torch.randn(24, 8, generator=gen) + 2 * labels[:, None]], [0], torch.arange(24), labels)

    def routers():
        torch.manual_seed(1)
        return nn.ModuleList([nn.Linear(8, 3)])

    cfg = make_config("cpu", {"router_epochs": 4, "router_rows": 8, "router_try_rows": 2, "router_batch_size": 4})
    chosen, log, choice = train_router_rows(cfg, train, routers, "test", lambda r: 0.75)
    assert choice == {"tried": [{"rows": 8, "chosen_epoch": 0, "routed": 0.75},
                                {"rows": 2, "chosen_epoch": 0, "routed": 0.75}], "rows": 8}
    one_epoch = routers()
    train_router_set(make_config("cpu", {"router_epochs": 1, "router_batch_size": 4}), train, one_epoch, "test")
    for a, b in zip(chosen.parameters(), one_epoch.parameters()):
        assert torch.equal(a, b)


def test_adapters_are_addressed_by_name():
    """add_adapter names an adapter (its task); get_adapter and the single gate take the name, not a position; a
    name twice or an unknown name is a one-line error."""
    model = tiny_qwen2()
    lora.inject(model)
    gen = torch.Generator().manual_seed(4)
    adapters = {t: random_adapter(model, r, 8, gen) for t, r in (("qa", 2), ("nli", 4))}
    for t, a in adapters.items():
        assert lora.add_adapter(model, a, name=t) == t
    assert lora.adapter_names(model) == ["qa", "nli"]
    for t, a in adapters.items():
        got = lora.get_adapter(model, t)
        assert all(torch.equal(got.modules[m].A, a.modules[m].A) for m in a.modules)
    assert lora.one_hot(model, "nli").tolist() == [0.0, 1.0]
    with pytest.raises(BadInput, match="already holds an adapter named 'qa'"):
        lora.add_adapter(model, adapters["qa"], name="qa")
    for call in (lambda: lora.get_adapter(model, "sentiment"), lambda: lora.one_hot(model, "sentiment")):
        with pytest.raises(BadInput, match="no adapter named 'sentiment' in the model: it holds qa, nli"):
            call()
