"""The GPU check (`make gpu-check`): the paper path on a random-initialised Qwen2-1.5B in bf16, no hub needed.

    python scripts/gpu_check.py                      # on CUDA; writes results/gpu-check.json, then run the benchmark:
    python benchmarks/bench.py --device cuda --out results/bench-gpu
    python scripts/gpu_check.py --device cpu --tiny  # the same checks on a tiny model (the test suite runs this)

Checks, each with its measured numbers in the JSON:
* paper-preset LoRA steps (batch 2 x 512 tokens, loss on the last 128, AdamW lr 5e-5, r 8, alpha 16, q/k/v/o):
  ours keeps float32 factors, the factor entries with a gradient above 1e-7 move (at least 99.9% of them; with bf16
  factors those above 2^-6 would not), the loss is finite; PEFT's LoRA on the same
  batches for the tokens/s ratio;
* a merge folded into the bf16 W and taken out again leaves W bit-identical;
* MoA batched (7 adapters, per-sample routes) gives each prompt the output it gets alone (greedy tokens).
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.bench import QWEN2_1_5B, random_adapters, sync  # noqa: E402
from src import lora  # noqa: E402
from src import merges  # noqa: E402
from src.files import atomic_write  # noqa: E402
from src.errors import BadInput  # noqa: E402
from src.train import lm_loss  # noqa: E402

TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)


def build(config: dict, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**config)).to(dtype)
    return model.requires_grad_(False).eval()


def batches(model, device, n: int, batch: int = 2, seq: int = 512, target: int = 128) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(100, model.config.vocab_size - 1, (batch, seq), generator=gen).to(device)
        labels = ids.clone()
        labels[:, :seq - target] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def check_training(model, device, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model

    data = batches(model, device, steps)
    plain = copy.deepcopy(model)
    lora.inject(model)
    lora.add_adapter(model, r=8, alpha=16, trainable=True, generator=torch.Generator().manual_seed(0))
    params = lora.adapter_parameters(model)
    init = [p.detach().clone() for p in params]
    touched = [torch.zeros_like(p, dtype=torch.bool) for p in params]
    opt = torch.optim.AdamW(params, lr=5e-5)
    losses = []

    def ours():
        for batch in data:
            loss, _ = lm_loss(model, batch)
            loss.backward()
            for t, p in zip(touched, params):
                t |= p.grad.abs() > 1e-7  # well above AdamW's eps: the step is about lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())

    ours_s = timed(ours, device)
    moved_share = torch.cat([(p.detach() != p0)[t] for p, p0, t in zip(params, init, touched)]).float().mean().item()
    moved = moved_share >= 0.999  # bf16 factors: the entries above 2^-6 would never move
    lora.remove(model)
    peft_model = get_peft_model(plain, LoraConfig(r=8, lora_alpha=16, target_modules=list(lora.ATTENTION_TARGETS)))
    peft_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-5)

    def peft():
        for batch in data:
            lm_loss(peft_model.base_model.model, batch)[0].backward()
            peft_opt.step()
            peft_opt.zero_grad(set_to_none=True)

    peft_s = timed(peft, device)
    tokens = sum(b["input_ids"].numel() for b in data)
    float32 = all(p.dtype == torch.float32 for p in params)
    finite = all(torch.isfinite(torch.tensor(losses)))
    return {"ok": moved and float32 and finite, "factors_float32": float32, "share_of_touched_entries_moved": moved_share,
            "losses": losses, "ours_tokens_per_s": tokens / ours_s, "peft_tokens_per_s": tokens / peft_s,
            "ratio": peft_s / ours_s, "note": "first steps include warm-up on both sides"}


def check_fold(model) -> dict:
    adapters = random_adapters(model, 7, torch.Generator().manual_seed(1))
    before = {n: p.clone() for n, p in model.named_parameters()}
    merged = merges.merge(adapters, "svd", rank=8)
    with lora.folded(model, merged):
        changed = sum(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    exact = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    return {"ok": exact and changed > 0, "weights_changed_while_folded": changed, "restored_bit_identical": exact}


@torch.no_grad()
def check_moa(model, device) -> dict:
    adapters = random_adapters(model, 7, torch.Generator().manual_seed(2), std=0.05)
    lora.inject(model)
    for a in adapters:
        lora.add_adapter(model, a)
    lora.attach_routers(model, lora.make_routers(model, 7, generator=torch.Generator().manual_seed(3)))
    ids = torch.randint(100, model.config.vocab_size - 1, (8, 64), generator=torch.Generator().manual_seed(4)).to(device)

    def greedy(x):
        with lora.routing(model):
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                                 pad_token_id=0)
            return out[:, x.shape[1]:], lora.route_decisions(model)

    batched_s = timed(lambda: greedy(ids), device)
    tokens, routes = greedy(ids)
    alone = [greedy(ids[i:i + 1]) for i in range(len(ids))]
    same_routes = all(torch.equal(r[0], routes[i]) for i, (_, r) in enumerate(alone))
    same_tokens = sum(torch.equal(t[0], tokens[i]) for i, (t, _) in enumerate(alone))
    lora.remove(model)
    return {"ok": same_routes, "same_routes_as_alone": same_routes, "same_tokens_as_alone": f"{same_tokens}/{len(ids)}",
            "batched_tokens_per_s": tokens.numel() / batched_s,
            "note": "bf16 batched and single-row matmuls may round differently, so a greedy token can differ"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny Qwen2 instead of Qwen2-1.5B (for the CPU test)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=str(REPO / "results" / "gpu-check.json"))
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput("no CUDA device: the GPU check needs one (or run it on the CPU with --device cpu --tiny)")
    model = build(TINY if args.tiny else QWEN2_1_5B, args.device, torch.bfloat16)
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "model": "tiny Qwen2" if args.tiny else "Qwen2-1.5B-shaped, random init", "dtype": "bfloat16",
              "torch": torch.__version__}
    for name, check in (("training", lambda: check_training(model, args.device, args.steps)),
                        ("fold", lambda: check_fold(model)), ("moa", lambda: check_moa(model, args.device))):
        report[name] = check()
        print(f"{name}: {'ok' if report[name]['ok'] else 'FAILED'} {json.dumps(report[name])[:300]}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(args.out), lambda f: f.write_text(json.dumps(report, indent=2)))
    if not all(report[k]["ok"] for k in ("training", "fold", "moa")):
        sys.exit(1)


if __name__ == "__main__":
    from src import cli

    cli.run(main)
