"""Training: one task's LoRA (`train_lora`) and the MoA routers over frozen task LoRAs (`train_routers`).

Presets hold every hyperparameter; a flag of the scripts overrides any of them.
* paper: the original's settings (its training scripts): r 8, alpha 16, AdamW lr 5e-5, batch 2, max length 512 of
  which up to 128 target tokens, 5,000 train rows, validation every 100 steps, patience 3, up to 10 epochs;
  routers: AdamW lr 1e-4, 1 epoch, batch 4.
* cpu: the same recipe sized for `make reproduce` on a 2-core laptop, chosen on validation rows by
  scripts/sweep_preset.py among seven settings of learning rate, steps, batch, training rows and max length, the best
  of those within its training budget (results/smollm2-135m/preset_sweep.md): lr 2e-3, 90 steps of batch 4, 400
  training rows, max length 192 with up to 64 target tokens. Same code path.

The LoRA loss is the mean cross-entropy over target tokens (and EOS); logits are computed only at those positions.
A checkpoint (adapter, optimizer, step, early-stopping state, log) is one safetensors file written atomically;
`resume=True` continues from it and ends with the same adapter as an uninterrupted run.

Data parallel (Hugging Face Accelerate; `accelerate launch` or `torchrun`): every process takes its share of each
global batch (the batch of a one-process run), the loss runs inside `TargetLoss.forward` (so DDP averages the
gradients in backward) and is normalised by the global number of target tokens, so N processes make the update of
one; validation is sharded and summed; only the main process writes checkpoints, logs and adapters. One process is
the same code with a world of one.
"""
import hashlib
import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from accelerate import Accelerator
from torch import nn

from . import peft_files
from . import lora
from . import provenance
from .data import PromptTooLong, encode_train, fit_prompt, load_rows, pad_batch
from .errors import BadInput
from .files import atomic_write
from .metrics import grouped_mean_interval
from .settings import DATA, SEED, Setting, check_config, setting, settings_of
from .tasks import TASKS, get_task


PRESETS = {
    "paper": {},
    # setting G of scripts/sweep_preset.py, the best on validation rows within the training budget
    # (results/smollm2-135m/preset_sweep.md); the routers learn on the LoRAs' 400 training rows or on their first 48,
    # for the epoch and the count that route held-out prompts best (no single setting routed well on every retrained
    # seed: results/REPORT.md)
    "cpu": dict(lr=2e-3, batch_size=4, epochs=100, max_steps=90, train_rows=400, val_rows=32, max_len=192,
                max_target=64, eval_every=30, patience=3, save_every=20, router_lr=1e-3, router_epochs=10,
                router_batch_size=8, router_rows=400, router_try_rows=48, router_heldout=24, router_select="heldout",
                max_prompt=192),
}

POSITIVE_COUNT = Setting(int, low=1)
# AdamW moves each entry by about lr per step: 0 or below trains nothing (or ascends), above 1 is a typo of an exponent
LEARNING_RATE = Setting(float, low=0, high=1, open="low")


@dataclass
class TrainConfig:
    """Every training setting, declared once: its default (the paper preset's), what it accepts (src/settings.py,
    checked by make_config before any model loads) and its flag's help; PRESETS holds the other presets' values."""
    preset: str = setting("paper", Setting(str, choices=tuple(PRESETS)), "the preset the other values start from")
    task: str = setting("sentiment", Setting(str, choices=tuple(TASKS)), "the task")
    model: str = setting("smollm2-135m", Setting(str), "hub id or folder (whether it exists is load_model's check)")
    data: str = setting("local", DATA, "shipped samples or the hub datasets")
    r: int = setting(8, POSITIVE_COUNT, "LoRA rank")
    alpha: float = setting(16, Setting(float, low=0, open="low"), "LoRA alpha (scale alpha / r; 0 would do nothing)")
    targets: tuple = setting(lora.ATTENTION_TARGETS, Setting(tuple),
                             "comma-separated module names, e.g. q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj")
    lr: float = setting(5e-5, LEARNING_RATE, "AdamW learning rate")
    batch_size: int = setting(2, POSITIVE_COUNT, "training batch size")
    epochs: int = setting(10, POSITIVE_COUNT, "passes over the training rows at most")
    max_steps: int = setting(0, Setting(int, low=0, note="0: no limit besides epochs and early stopping"),
                             "optimizer steps at most (0: no limit besides epochs and early stopping)")
    train_rows: int = setting(5000, POSITIVE_COUNT, "train-split rows the adapter trains on")
    val_rows: int = setting(500, POSITIVE_COUNT, "rows after them for early stopping and the best adapter")
    max_len: int = setting(512, Setting(int, low=2), "tokens per training row (at least one target token and EOS)")
    max_target: int = setting(128, POSITIVE_COUNT, "target tokens per row at most")
    eval_every: int = setting(100, POSITIVE_COUNT, "steps between validations")
    patience: int = setting(3, POSITIVE_COUNT, "validations without improvement before stopping")
    save_every: int = setting(100, POSITIVE_COUNT, "steps between checkpoints")
    seed: int = setting(0, SEED, "seed of the initialisation, the batch order and the routers")
    router_lr: float = setting(1e-4, LEARNING_RATE, "MoA routers: AdamW learning rate")
    router_epochs: int = setting(1, POSITIVE_COUNT, "MoA routers: passes over their rows (at most, with heldout)")
    router_batch_size: int = setting(4, POSITIVE_COUNT, "MoA routers: batch size")
    router_rows: int = setting(5000, POSITIVE_COUNT, "MoA routers: train rows per task")
    router_try_rows: int = setting(0, Setting(int, low=0, note="0: router_rows only"),
                                   "MoA routers: also train on only the first N of those rows per task and keep the "
                                   "routers that route held-out prompts more accurately (needs router_select heldout; "
                                   "0: router_rows only)")
    router_heldout: int = setting(200, POSITIVE_COUNT, "MoA routers: rows per task after those, for the routing "
                                                        "accuracy (and as many after them for the epoch and row "
                                                        "count, with heldout)")
    router_select: str = setting("last", Setting(str, choices=("last", "heldout")),
                                 "MoA routers kept: the last epoch's, or the epoch's whose routers route the next "
                                 "router_heldout rows (after the accuracy's) best")
    max_prompt: int = setting(400, POSITIVE_COUNT, "prompt tokens for the routers (the content field is cut)")


TRAIN_SETTINGS = settings_of(TrainConfig)


def make_config(preset: str, overrides: dict | None = None) -> TrainConfig:
    """The preset's TrainConfig with `overrides` (None: keep the preset's value). An unknown key is an error, not
    silently dropped: a misspelt override would otherwise train with the preset's value."""
    if preset not in PRESETS:
        raise BadInput(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise BadInput(f"unknown training setting(s) {', '.join(unknown)}: TrainConfig has {', '.join(sorted(known))}")
    values = {**PRESETS[preset], **{k: v for k, v in (overrides or {}).items() if v is not None}, "preset": preset}
    if "targets" in values and isinstance(values["targets"], str):
        values["targets"] = tuple(t.strip() for t in values["targets"].split(",") if t.strip())
    cfg = check_config(TrainConfig(**values), TRAIN_SETTINGS)
    if cfg.router_try_rows and cfg.router_select != "heldout":
        raise BadInput(f"--router-try-rows {cfg.router_try_rows} is chosen against --router-rows on held-out prompts: "
                       "add --router-select heldout, or give --router-try-rows 0")
    if cfg.router_try_rows >= cfg.router_rows:
        raise BadInput(f"--router-try-rows {cfg.router_try_rows} is not fewer than --router-rows {cfg.router_rows}: "
                       "give fewer rows to try, or 0")
    return cfg


def check_task_sets(task_sets: list[list[str]]):
    """Refuse task sets the routers cannot be trained on, before any adapter or model loads: a router chooses
    among its set's adapters (with one task there is no choice and the accuracy is 1 by construction), and each set
    is written to moa-<N>, so two sets of the same size would overwrite each other."""
    for tasks in task_sets:
        if len(tasks) < 2:
            other = next(t for t in TASKS if t not in tasks)
            raise BadInput(f"--tasks {','.join(tasks)}: a router chooses among tasks, give at least 2 "
                           f"(e.g. --tasks {','.join([*tasks, other])})")
    sizes = [len(tasks) for tasks in task_sets]
    same = sorted({n for n in sizes if sizes.count(n) > 1})
    if same:
        raise BadInput(f"several --tasks sets of {same[0]} tasks would all be written to moa-{same[0]}: "
                       "give one set per size")


def make_accelerator() -> Accelerator:
    """The Accelerator of the scripts: GPUs when present, else CPU processes (gloo) under torchrun. Without
    `cpu=True` a CPU-only machine would not see the other processes (each would think it is alone)."""
    return Accelerator(cpu=not torch.cuda.is_available())


@contextmanager
def padding_skipped(model, attention_mask: torch.Tensor):
    """Within this context the frozen linear layers of `model` (all its matmuls but attention's and the LoRA
    factors') multiply only the rows of real tokens: their input is gathered to (n_real, d) and their output
    scattered back, zero at padded positions. A padded position never reaches a real token's output (it comes after
    it, or attention masks it) and gets no gradient, so the loss and the gradients are those of the padded batch.
    The cpu preset's training batches are 19% padding; on this repo's CPU machine the adapters and routers trained
    with and without it are bitwise identical (at these sizes a matmul's row does not depend on the other rows there;
    at 1 or 7 rows it can)."""
    keep = attention_mask.reshape(-1).nonzero().squeeze(1)
    if len(keep) == attention_mask.numel():
        yield
        return
    shape = attention_mask.shape

    def gather(module, args):
        return (args[0].reshape(-1, args[0].shape[-1]).index_select(0, keep),)

    def scatter(module, args, out):
        return out.new_zeros(shape.numel(), out.shape[-1]).index_copy(0, keep, out).view(*shape, out.shape[-1])

    handles = []
    for m in model.base_model.modules():
        if isinstance(m, nn.Linear) and not m.weight.requires_grad:
            handles += [m.register_forward_pre_hook(gather), m.register_forward_hook(scatter)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class TargetLoss(nn.Module):
    """Sum of the cross-entropy over the target tokens of a right-padded batch, and their number. The vocabulary
    projection runs only at target positions. A module, so that DDP sees the forward that produces the loss."""

    def __init__(self, model, skip_padding: bool = True):
        super().__init__()
        self.model = model
        self.skip_padding = skip_padding  # False only to measure what padding_skipped saves (benchmarks/bench.py)

    def forward(self, input_ids, attention_mask, labels):
        with padding_skipped(self.model, attention_mask) if self.skip_padding else nullcontext():
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        labels = labels[:, 1:]
        where = labels != -100
        logits = self.model.get_output_embeddings()(hidden[:, :-1][where])
        return F.cross_entropy(logits.float(), labels[where], reduction="sum"), where.sum()


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the target tokens of a batch, and their number (one process)."""
    total, n = TargetLoss(model)(batch["input_ids"], batch["attention_mask"], batch["labels"])
    return total / n, int(n)


def _shard(items: list, accelerator: Accelerator) -> list:
    return items[accelerator.process_index::accelerator.num_processes]


def _reduce_sum(values: list[float], accelerator: Accelerator, device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    return (accelerator.reduce(t, "sum") if accelerator.num_processes > 1 else t).tolist()


@torch.no_grad()
def validation_loss(model, examples: list[dict], batch_size: int, pad_id: int, accelerator: Accelerator) -> float:
    """Mean target-token cross-entropy over `examples`, each process taking its share."""
    total, count = 0.0, 0
    loss_fn, mine = TargetLoss(model), _shard(examples, accelerator)
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        batch = pad_batch([e["input_ids"] for e in chunk], pad_id, left=False, labels=[e["labels"] for e in chunk])
        s, n = loss_fn(**{k: v.to(model.device) for k, v in batch.items()})
        total, count = total + s.item(), count + int(n)
    total, count = _reduce_sum([total, count], accelerator, model.device)
    return total / count


def encode_rows(task, rows: list[dict], tokenizer, cfg: TrainConfig) -> tuple[list[dict], int]:
    """Training examples of the rows that fit max_len (see fit_prompt), and how many did not."""
    examples = []
    for row in rows:
        try:
            examples.append(encode_train(task, row, tokenizer, cfg.max_len, cfg.max_target))
        except PromptTooLong:
            pass
    return examples, len(rows) - len(examples)


def task_seed(seed: int, task: str) -> int:
    """The seed of one task's run: a function of the run's seed and the task's name. The original trained each task
    in its own unseeded process, so every task's A was an independent draw; one shared seed would make all seven A
    identical (and concat / weight summing would then compute something else). A rerun stays bit-identical."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{task}".encode()).digest()[:4], "little")


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    # a function of (seed, epoch) alone, so a resumed run sees the same batches
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def _save_checkpoint(path: Path, model, optimizer, state: dict, best: dict):
    params = lora.adapter_parameters(model)
    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    tensors.update({f"best.{k}": v.cpu().contiguous() for k, v in best.items()})
    for i, p in enumerate(params):
        for k, v in optimizer.state.get(p, {}).items():
            tensors[f"opt.{i}.{k}"] = v.detach().cpu().reshape(v.shape).contiguous()
    tensors["rng"] = torch.get_rng_state()
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"state": json.dumps(state)}))


def _load_checkpoint(path: Path, model, optimizer) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        state = json.loads(f.metadata()["state"])
    tensors = load_file(str(path))
    params = lora.adapter_parameters(model)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
            opt_state = {k.split(".", 2)[2]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
            if opt_state:
                optimizer.state[p] = opt_state
    torch.set_rng_state(tensors["rng"])
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
    return state, best


def _snapshot(model) -> dict:
    return {f"{i}": p.detach().clone() for i, p in enumerate(lora.adapter_parameters(model))}


def train_lora(cfg: TrainConfig, model, tokenizer, out_dir, resume: bool = False,
               accelerator: Accelerator | None = None) -> dict:
    """Train cfg.task's LoRA on `model` (injected here, removed at the end); the main process writes the best
    adapter (lowest validation loss) in PEFT format to out_dir with train_log.jsonl. Returns a summary."""
    acc = accelerator or make_accelerator()
    task = get_task(cfg.task)
    device = model.device
    pad = tokenizer.eos_token_id
    train_rows = load_rows(task, "train", cfg.data, n=cfg.train_rows)
    val_rows = load_rows(task, "train", cfg.data, n=cfg.val_rows, offset=len(train_rows))
    train_ex, skipped = encode_rows(task, train_rows, tokenizer, cfg)
    val_ex, skipped_val = encode_rows(task, val_rows, tokenizer, cfg)
    if not train_ex or not val_ex:
        raise BadInput(f"{task.name}: no training or validation row fits max_len {cfg.max_len}: raise --max-len")
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoint.safetensors"
    steps_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    total = min(total, cfg.max_steps) if cfg.max_steps else total

    seed = task_seed(cfg.seed, cfg.task)
    torch.manual_seed(seed)
    lora.inject(model, cfg.targets)
    try:
        lora.add_adapter(model, r=cfg.r, alpha=cfg.alpha, trainable=True, generator=torch.Generator().manual_seed(seed),
                         name=cfg.task)
        model.train()
        optimizer = torch.optim.AdamW(lora.adapter_parameters(model), lr=cfg.lr)
        state = {"step": 0, "best_val": None, "bad": 0, "log": [], "stopped": False, "config": asdict(cfg)}
        best = _snapshot(model)
        if resume and ckpt_path.exists():
            state, best = _load_checkpoint(ckpt_path, model, optimizer)
            # a setting added since the checkpoint was written had the value its default gives now
            written = {**json.loads(json.dumps(asdict(TrainConfig()))), **state["config"]}
            if written != json.loads(json.dumps(asdict(cfg))):
                raise BadInput(f"{ckpt_path} was written with other settings: delete it or drop --resume")
        loss_module = acc.prepare_model(TargetLoss(model))  # DDP under several processes, itself under one
        bar = tqdm(total=total, initial=state["step"], desc=f"train {cfg.task}", unit="step",
                   disable=not acc.is_main_process)
        tokens, started = 0, time.perf_counter()
        while state["step"] < total and not state["stopped"]:
            step = state["step"]
            order = _epoch_order(len(train_ex), seed, step // steps_per_epoch)
            start = (step % steps_per_epoch) * cfg.batch_size
            chunk = [train_ex[i] for i in order[start:start + cfg.batch_size]]
            # this process's share of the global batch; a process left without a row runs one with weight 0, so
            # that DDP's gradient all-reduce still happens everywhere
            mine, weight = (_shard(chunk, acc), 1.0) if len(chunk) > acc.process_index else (chunk[:1], 0.0)
            batch = pad_batch([e["input_ids"] for e in mine], pad, left=False, labels=[e["labels"] for e in mine])
            batch = {k: v.to(device) for k, v in batch.items()}
            n_local = int((batch["labels"][:, 1:] != -100).sum()) * weight
            n_global, seen = _reduce_sum([n_local, float(batch["attention_mask"].sum()) * weight], acc, device)
            loss_sum, _ = loss_module(**batch)
            # DDP averages gradients over processes: scale so the result is the gradient of the global mean
            (loss_sum * (weight * acc.num_processes / n_global)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = _reduce_sum([loss_sum.item() * weight], acc, device)[0] / n_global
            tokens += seen
            state["step"] = step = step + 1
            entry = {"step": step, "loss": round(loss, 6),
                     "tokens_per_s": round(tokens / (time.perf_counter() - started), 1)}
            if step % cfg.eval_every == 0 or step == total:
                model.eval()
                entry["val_loss"] = round(validation_loss(model, val_ex, cfg.batch_size, pad, acc), 6)
                model.train()
                if state["best_val"] is None or entry["val_loss"] < state["best_val"]:
                    state["best_val"], state["bad"], best = entry["val_loss"], 0, _snapshot(model)
                else:
                    state["bad"] += 1
                    state["stopped"] = state["bad"] >= cfg.patience
            state["log"].append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.3f}", **({"val": f"{entry['val_loss']:.3f}"} if "val_loss" in entry else {}))
            bar.update(1)
            if step % cfg.save_every == 0 and acc.is_main_process:
                out_dir.mkdir(parents=True, exist_ok=True)
                _save_checkpoint(ckpt_path, model, optimizer, state, best)
        bar.close()
        with torch.no_grad():
            for i, p in enumerate(lora.adapter_parameters(model)):
                p.copy_(best[str(i)])
        adapter = lora.get_adapter(model, cfg.task, base_model=cfg.model)
    finally:
        acc.free_memory()
        lora.remove(model)
        model.eval()
    if acc.is_main_process:
        peft_files.save_adapter(adapter, out_dir, cfg.targets)
        provenance.write_record(out_dir, {
            "task": cfg.task, "base_model": cfg.model, "preset": cfg.preset, "source": provenance.data_source(task, cfg.data),
            "rows": {"train": [0, len(train_rows)], "validation": [len(train_rows), len(train_rows) + len(val_rows)]},
            "skipped_rows": skipped + skipped_val, "max_len": cfg.max_len, "max_target": cfg.max_target,
            "seed": cfg.seed, "task_seed": seed, "steps": state["step"], "best_val_loss": state["best_val"],
            "processes": acc.num_processes, "commit": provenance.commit(), "config": asdict(cfg)})
        atomic_write(out_dir / "train_log.jsonl", lambda p: p.write_text("".join(json.dumps(e) + "\n" for e in state["log"])))
        ckpt_path.unlink(missing_ok=True)
    acc.wait_for_everyone()
    return {"task": cfg.task, "steps": state["step"], "best_val_loss": state["best_val"],
            "early_stopped": state["stopped"], "train_rows": len(train_ex), "val_rows": len(val_ex),
            "skipped_rows": skipped + skipped_val, "processes": acc.num_processes}


def publish_log(adapter_folder: Path, dest: Path, name: str = "train_log.jsonl"):
    """Copy a finished run's log next to the results (adapters/ stays out of git; the logs do not): a LoRA's
    train_log.jsonl, or the routers' routers.json (held-out routing accuracy per layer, settings, loss curve)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    text = (Path(adapter_folder) / name).read_text()
    atomic_write(dest, lambda p: p.write_text(text))


# -------------------------------------------------------------------------------------------------- routers
def prompt_items(tasks: list[str], rows: dict, tokenizer, budget: int) -> list[tuple[int, list[int]]]:
    """(task index, prompt ids) for every row of every task, in task order."""
    return [(k, fit_prompt(get_task(t), r, tokenizer, budget, strict=False)) for k, t in enumerate(tasks) for r in rows[t]]


def prompt_batches(items: list, pad_id: int, batch_size: int):
    """Left-padded prompt batches of (task index, ids) items, with their task labels."""
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        yield pad_batch([ids for _, ids in chunk], pad_id, left=True), torch.tensor([k for k, _ in chunk])


@torch.no_grad()
def routing_accuracy(model, tasks, rows, tokenizer, budget, batch_size) -> dict:
    """Route held-out prompts for real (each layer's router picks an adapter at the prompt, the earlier layers'
    choices feeding the later layers' inputs) and compare with the gold task: the share of (sample, layer) decisions
    that are right, with its 95% interval over resampled prompts, per task and per layer."""
    decisions, labels = [], []
    items = sorted(prompt_items(tasks, rows, tokenizer, budget), key=lambda item: len(item[1]))  # less padding
    for batch, gold in prompt_batches(items, tokenizer.eos_token_id, batch_size):
        with lora.routing(model):
            model.base_model(**{k: v.to(model.device) for k, v in batch.items()})
            decisions.append(lora.route_decisions(model).cpu())
        labels.append(gold)
    decisions, labels = torch.cat(decisions), torch.cat(labels)
    right = (decisions == labels[:, None]).float()
    return {"accuracy": right.mean().item(), "interval": grouped_mean_interval(right.mean(1), labels),
            "per_task": {t: right[labels == k].mean().item() for k, t in enumerate(tasks)},
            "per_layer": right.mean(0).tolist(), "n_prompts": len(labels)}


def gather_items(x: torch.Tensor, n_items: int, accelerator: Accelerator) -> torch.Tensor:
    """Every process's rows of `x` gathered to all, back in item order: process p of N holds items p, p + N, ..."""
    n = accelerator.num_processes
    padded = accelerator.pad_across_processes(x.to(accelerator.device), dim=0)
    gathered = accelerator.gather(padded).cpu().reshape(n, -1, *x.shape[1:])
    out = torch.empty(n_items, *x.shape[1:], dtype=x.dtype)
    for p in range(n):
        out[p::n] = gathered[p, :len(range(p, n_items, n))]
    return out


@torch.no_grad()
def router_features(model, items: list, pad_id: int, batch_size: int, accelerator: Accelerator):
    """`lora.router_inputs` of every (gold task, prompt) item, with each item's gold adapter active; the items are
    shared out over the processes and the features gathered back to all. Returns (features, where): features a
    list of U tensors (items, d_u), one per distinct layer input, of the widths of the layers reading them
    (hidden_size, or intermediate_size for down_proj); where as in `lora.router_inputs`."""
    if len(items) < accelerator.num_processes:
        raise BadInput(f"{len(items)} router prompts for {accelerator.num_processes} processes: raise --router-rows")
    mine = list(range(accelerator.process_index, len(items), accelerator.num_processes))
    feats, where = None, None
    for i in tqdm(range(0, len(mine), batch_size), desc="router features", unit="batch",
                  disable=not accelerator.is_main_process):
        chunk = [items[j] for j in mine[i:i + batch_size]]
        batch, gold = next(prompt_batches(chunk, pad_id, len(chunk)))
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with padding_skipped(model, batch["attention_mask"]):
            f, where = lora.router_inputs(model, batch["input_ids"], batch["attention_mask"], gold.to(model.device))
        if feats is None:  # filled in place rather than concatenated at the end: no second copy of many GB
            feats = [torch.empty(len(mine), x.shape[1], dtype=x.dtype) for x in f]
        for out, x in zip(feats, f):
            out[i:i + len(chunk)] = x.cpu()
    if accelerator.num_processes > 1:
        feats = [gather_items(x, len(items), accelerator) for x in feats]
    return feats, where


@dataclass
class RouterRows:
    """Prompts for the routers: their features (`router_features`: one tensor per distinct layer input, `where`
    mapping layers to them) and the rows of those a task set reads, rows[i] labelled labels[i] (read in place: a
    copy of the set's rows could be tens of GB)."""
    features: list
    where: list
    rows: torch.Tensor
    labels: torch.Tensor


def train_router_set(cfg: TrainConfig, train: RouterRows, routers: nn.ModuleList, desc: str,
                     routed=None) -> list[dict]:
    """Train `routers` on precomputed features: epochs of shuffled batches, loss = mean over routers of the
    cross-entropy against the task (`lora.router_loss`). With `routed` (cfg.router_select "heldout"), the routers
    are scored by `routed(routers)` after every epoch (in train_routers: the accuracy of routing held-out prompts for
    real) and those of the best epoch are kept, the first of equals (the epochs chosen on held-out prompts, never on
    test rows). Returns the log: a line per step, and with `routed` a line per epoch and the chosen one."""
    optimizer = torch.optim.AdamW(routers.parameters(), lr=cfg.router_lr)
    device = next(routers.parameters()).device
    n = len(train.labels)
    steps_per_epoch = math.ceil(n / cfg.router_batch_size)
    log, best = [], None
    with tqdm(total=cfg.router_epochs * steps_per_epoch, desc=desc, unit="step") as bar:
        for epoch in range(cfg.router_epochs):
            order = torch.tensor(_epoch_order(n, cfg.seed, epoch))
            for i in range(0, n, cfg.router_batch_size):
                idx = order[i:i + cfg.router_batch_size]
                gold = train.labels[idx].to(device)
                loss, predicted = lora.router_loss(routers, [f[train.rows[idx]].to(device) for f in train.features],
                                                   train.where, gold)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                log.append({"epoch": epoch, "loss": loss.item(),
                            "train_accuracy": (predicted == gold).float().mean().item()})
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{log[-1]['train_accuracy']:.2f}")
                bar.update(1)
            if routed is not None:
                score = routed(routers)
                log.append({"epoch": epoch, "routed": score})
                if best is None or score > best["routed"]:
                    best = {"chosen_epoch": epoch, "routed": score,
                            "state": {k: v.detach().clone() for k, v in routers.state_dict().items()}}
    if best is not None:
        routers.load_state_dict(best.pop("state"))
        log.append(best)
    return log


def first_rows(rows: RouterRows, n: int) -> RouterRows:
    """The first n prompts of each task in `rows` (in their row order): the routers' rows cut to n per task."""
    keep = torch.cat([(rows.labels == k).nonzero()[:n, 0] for k in rows.labels.unique()])
    return RouterRows(rows.features, rows.where, rows.rows[keep], rows.labels[keep])


def train_router_rows(cfg: TrainConfig, train: RouterRows, make_routers, desc: str, routed=None):
    """Routers trained on cfg.router_rows prompts per task, and with cfg.router_try_rows also on only the first
    router_try_rows of them (fresh routers from `make_routers`, the same seed and batch orders); with `routed`, each
    run's epoch and then the row count are chosen by `routed(routers)`: in train_routers, the accuracy of routing
    held-out prompts for real, each layer's router choosing at the prompt, the earlier layers' choices feeding the
    later layers' inputs. The routers learn with teacher forcing (every layer's input made with the gold adapter),
    and their loss on held-out prompts under teacher forcing does not see the failure this guards against: on
    retrained seed 1 that loss fell at every one of 10 epochs on 400 rows while routing for real sent sentiment's
    prompts elsewhere (results/REPORT.md). Ties keep router_rows and the earlier epoch. Neither count nor
    epoch is better on every seed, so both are chosen per run, never on test rows. Returns (routers, their log, the
    choice: {"tried": [{rows, chosen_epoch, routed} per count], "rows": the count kept}, or None with one count)."""
    counts = [cfg.router_rows] + ([cfg.router_try_rows] if cfg.router_try_rows else [])
    runs = []
    for n in counts:
        routers = make_routers()
        log = train_router_set(cfg, first_rows(train, n), routers, desc + (f", {n} rows" if len(counts) > 1 else ""),
                               routed)
        runs.append((routers, log, {"rows": n, **log[-1]}))
    if len(runs) == 1:
        return runs[0][0], runs[0][1], None
    routers, log, kept = max(runs, key=lambda run: run[2]["routed"])   # the first of equals: router_rows
    return routers, log, {"tried": [tried for _, _, tried in runs], "rows": kept["rows"]}


def train_routers(cfg: TrainConfig, task_sets: list[list[str]], model, tokenizer, adapters: dict, out_dirs: list,
                  accelerator: Accelerator | None = None) -> list[dict]:
    """Train one router per LoRA layer over the frozen task adapters, for each task set (in its order), with
    teacher forcing: the gold task's adapter is active, the loss is the mean over routers of the cross-entropy
    against the task. A prompt's features depend only on its gold adapter, so they are computed once for the
    union of the sets (sharded over the processes) and shared by every set and epoch; the routers, a few linear
    classifiers, are then trained on the main process. Returns each set's held-out routing accuracy."""
    check_task_sets(task_sets)
    acc = accelerator or make_accelerator()
    union = list(dict.fromkeys(t for tasks in task_sets for t in tasks))
    targets = sorted({n.rpartition(".")[2] for n in adapters[union[0]].modules})
    rows = {t: load_rows(get_task(t), "train", cfg.data, n=cfg.router_rows) for t in union}
    heldout = {t: load_rows(get_task(t), "train", cfg.data, n=cfg.router_heldout, offset=len(rows[t])) for t in union}
    items = prompt_items(union, rows, tokenizer, cfg.max_prompt)
    # the epoch (and row count) is chosen on the next router_heldout rows, so the accuracy reported on `heldout`
    # stays unbiased
    choosing = {t: load_rows(get_task(t), "train", cfg.data, n=cfg.router_heldout, offset=len(rows[t]) + len(heldout[t]))
                for t in union} if cfg.router_select == "heldout" else None
    lora.inject(model, targets)
    try:
        for t in union:
            lora.add_adapter(model, adapters[t], name=t)
        features, where = router_features(model, items, tokenizer.eos_token_id, cfg.router_batch_size, acc)
    finally:
        lora.remove(model)

    def rows_of(tasks: list) -> RouterRows:
        task_of = torch.tensor([k for k, _ in items])
        return RouterRows(features, where, torch.cat([(task_of == union.index(t)).nonzero()[:, 0] for t in tasks]),
                          torch.cat([torch.full(((task_of == union.index(t)).sum(),), k) for k, t in enumerate(tasks)]))

    results = []
    for tasks, out_dir in zip(task_sets, out_dirs):
        accuracy = None
        if acc.is_main_process:
            lora.inject(model, targets)
            try:
                for t in tasks:
                    lora.add_adapter(model, adapters[t], name=t)

                def routed(routers: nn.ModuleList) -> float:
                    lora.attach_routers(model, routers)
                    return routing_accuracy(model, tasks, choosing, tokenizer, cfg.max_prompt, 16)["accuracy"]

                routers, log, choice = train_router_rows(
                    cfg, rows_of(tasks),
                    lambda: lora.make_routers(model, len(tasks), generator=torch.Generator().manual_seed(cfg.seed)),
                    f"routers {len(tasks)} tasks", routed if choosing else None)
                lora.attach_routers(model, routers)
                accuracy = routing_accuracy(model, tasks, heldout, tokenizer, cfg.max_prompt, 16)
                lora.save_routers(model, out_dir, tasks, cfg.model,
                                  extra={"heldout_accuracy": accuracy, "config": asdict(cfg), "log": log,
                                         **({"router_rows_chosen": choice} if choice else {})})
            finally:
                lora.remove(model)
        acc.wait_for_everyone()
        results.append(accuracy)
    return results
