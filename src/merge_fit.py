"""Merges that look at data: the two learned merges, and the choice of a method's hyperparameters. Train rows only.

* `cat` (LoRA Soups, CAT): the concatenated task LoRAs with one learnable scalar per adapter per adapted module,
  trained by gradient (AdamW) on a mixed set of `rows` rows of every task, LoRAs frozen; then folded into one
  concatenated adapter with those scalars as weights. Permuting the adapters permutes the scalars (same batches;
  equal up to the float rounding of a sum taken in another order).
* `lorahub` (LoraHub): weights w of the factor sum s (sum_i w_i B_i)(sum_i w_i A_i), found by Nevergrad's NGOpt
  (gradient-free, `budget` evaluations, w in [-bound, bound], starting at 0 as LoraHub does) on the mean target-token
  loss of `rows` rows per task plus l1 * sum |w_i|. Not invariant to the order of the adapters: the optimiser's
  random search treats the coordinates of w differently (a permuted list is a different search, seeded alike).
* `regmean` (RegMean, Jin et al., ICLR 2023): the Gram matrices of each task's layer inputs, collected on the first
  `rows` rows its adapter trained on with that adapter folded in; then, for each alpha of its grid, the exact
  LoRA merges.regmean builds from them (no d_out x d_in matrix), alpha chosen on the rows after the training rows.
  Order-invariant (a sum and one solve).
* `regmean_pp` (RegMean++, Nguyen et al., TMLR 2026): RegMean block by block in forward order, each block's Grams
  on the inputs the merged earlier blocks give each task's rows (through that task's own block), so a block's
  merge sees what merging (and truncating) the blocks before it changed. Same rows, solve and truncation as
  `regmean`; one pass through the blocks per alpha.
* `build` is what evaluation calls for any merge: a data method is fitted; a data-free method with a grid (lambda,
  alpha) is merged at every candidate and the one with the lowest validation loss is kept; when the best value
  sits at an end of the values tried, the search goes on past that end (halving below, doubling above, within the
  parameter's range) until the best is inside, so no method is compared at the edge of its grid.

Rows: every data step (CAT, LoraHub, the grid search) reads the first rows of the train split after the rows each
adapter trained on, as its training record says (src/provenance.py; the early-stopping rows come first there:
read, never trained on), never a test row and never a training row (`TaskRows`). Or, for adapters trained
elsewhere (merge_adapters.py --rows), the rows a user gives, one JSON-lines file per adapter (`FileRows`): which
rows an adapter trained on is then the user's to know.
"""
import itertools
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import lora
from . import merges
from . import provenance
from . import registry
from .data import RowFile, encode_pair, load_rows, pad_batch, read_row_file
from .errors import BadInput, MissingFile
from .train import TargetLoss, encode_rows, make_accelerator, make_config, validation_loss
from .tasks import get_task


@dataclass
class TaskRows:
    """Where one adapter's rows come from when it is a task's: the task's train split, the rows after those its
    adapter trained on (its training record says which: src/provenance.py), never one it trained on."""
    task: str
    record: dict | None       # the adapter's training record; None: it has none, and no row can be chosen
    data: str = "local"

    def examples(self, n: int, tokenizer, window: int) -> tuple[list, list]:
        """(examples, [start, end)) for the n train-split rows after the adapter's training rows (rows longer than
        the adapter's max length are skipped, as in its training; `window` is not needed: max_len is below it)."""
        start, end = provenance.rows_after_training({self.task: self.record}, n)[self.task]
        try:
            rows = load_rows(get_task(self.task), "train", self.data, n=n, offset=start)
        except BadInput:  # not one row left after the training rows
            rows = []
        if len(rows) < n:
            raise BadInput(f"{self.task}: {n} rows after the {start} its adapter trained on need {end} train-split "
                           f"rows, the data has {start + len(rows)}: ask for fewer rows or train on fewer")
        return self._encode(rows, start, end, tokenizer), [start, end]

    def training_examples(self, n: int, tokenizer, window: int) -> tuple[list, list]:
        """(examples, [start, end)) for the first n of the rows the adapter trained on (all of them if fewer): the
        inputs its fine-tuned model was fitted to (RegMean's Gram matrices)."""
        if self.record is None:
            raise MissingFile(f"the adapter of {self.task} has no {provenance.RECORD}: which rows it trained on is "
                              "unknown, so RegMean cannot collect its inputs: retrain it")
        start, end = self.record["rows"]["train"]
        end = min(end, start + n)
        return self._encode(load_rows(get_task(self.task), "train", self.data, n=end - start, offset=start),
                            start, end, tokenizer), [start, end]

    def _encode(self, rows: list, start: int, end: int, tokenizer) -> list:
        """Rows encoded as the adapter's training encoded them (its max lengths; longer rows skipped)."""
        rec = self.record
        cfg = make_config(rec["preset"], {"max_len": rec["max_len"], "max_target": rec["max_target"]})
        examples = encode_rows(get_task(self.task), rows, tokenizer, cfg)[0]
        if not examples:
            raise BadInput(f"{self.task}: none of train-split rows [{start}, {end}) fits the adapter's max length "
                           f"{rec['max_len']}: ask for more rows")
        return examples


@dataclass
class FileRows:
    """Where one adapter's rows come from when a user gives them: a JSON-lines file of {"prompt", "target"} rows
    (src.data.read_row_file), read once, so that the hash recorded names the rows used."""
    file: RowFile

    @classmethod
    def read(cls, path) -> "FileRows":
        return cls(read_row_file(path))

    def examples(self, n: int, tokenizer, window: int) -> tuple[list, dict]:
        """(examples, what was used) for the file's first n rows (all of them, if it has fewer). A row longer than
        the model's `window` (prompt, target and EOS) is a BadInput naming its line: it cannot be scored whole."""
        used, examples = self.file.rows[:n], []
        for line, row in used:
            example = encode_pair(row["prompt"], row["target"], tokenizer)
            if len(example["input_ids"]) > window:
                raise BadInput(f"{self.file.path}, line {line}: {len(example['input_ids'])} tokens (prompt, target "
                               f"and EOS), longer than the model's window of {window}: shorten the row")
            examples.append(example)
        return examples, {"file": str(self.file.path), "sha256": self.file.sha256, "rows": len(used),
                          "of": len(self.file.rows), "lines": [used[0][0], used[-1][0]]}

    def training_examples(self, n: int, tokenizer, window: int) -> tuple[list, dict]:
        """A user's file does not say which rows the adapter trained on: its first n rows stand in for them (the
        same rows a grid is chosen on)."""
        return self.examples(n, tokenizer, window)


def model_window(model, tokenizer) -> int:
    """The longest sequence the model takes: its config's max_position_embeddings (else the tokenizer's limit)."""
    return getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length


@dataclass
class FitData:
    """What a data-driven step needs: the model, its tokenizer, and where each adapter's rows come from, in adapter
    order. By default every name of `tasks` is a task whose rows follow its adapter's training rows (`records`:
    TaskRows); `sources` may name other sources instead (a user's row files: FileRows). Every step reads the
    rows through `examples`, keyed by these names."""
    model: object
    tokenizer: object
    tasks: list               # the names of the row sources, in adapter order (task names, or row files)
    records: dict = field(default_factory=dict)   # {task: training record or None}, src/provenance.py
    data: str = "local"
    seed: int = 0
    batch_size: int = 8
    accelerator: object = None
    sources: dict | None = None   # {name: TaskRows or FileRows}; None: TaskRows of every task from `records`

    def __post_init__(self):
        if self.sources is None:
            self.sources = {t: TaskRows(t, self.records.get(t), self.data) for t in self.tasks}
        for source in self.sources.values():
            if isinstance(source, TaskRows) and source.record is not None:
                provenance.check_source(source.record, get_task(source.task), source.data)

    def rows(self, n: int) -> dict:
        """{task: [start, end)}: the n train-split rows per task after that task's adapter's training rows."""
        tasks = {t: s for t, s in self.sources.items() if isinstance(s, TaskRows)}
        missing = [t for t, s in tasks.items() if s.record is None]
        if missing:
            raise MissingFile(f"the adapter of {', '.join(missing)} has no {provenance.RECORD} (which rows it trained "
                              "on), so no rows can be chosen for this merge: retrain it, or fix the merge's "
                              "parameters with --set")
        return provenance.rows_after_training({t: s.record for t, s in tasks.items()}, n)

    def examples(self, n: int) -> tuple[dict, dict]:
        """({name: examples}, {name: which rows}) for n rows per source, in `tasks` order: a task's n rows after its
        adapter's training rows ([start, end)), or a file's first n rows (its name, hash and lines)."""
        self.rows(n)  # every task's adapter must have its record: all missing ones named at once
        return self._per_source("examples", n)

    def training_examples(self, n: int) -> tuple[dict, dict]:
        """({name: examples}, {name: which rows}) for the first n rows each adapter trained on (a task's), or a
        file's first n rows."""
        return self._per_source("training_examples", n)

    def _per_source(self, which: str, n: int) -> tuple[dict, dict]:
        window = model_window(self.model, self.tokenizer)
        out, where = {}, {}
        for t in self.tasks:
            out[t], where[t] = getattr(self.sources[t], which)(n, self.tokenizer, window)
        return out, where

    def loss(self, examples: dict) -> dict:
        """Mean target-token loss per task of the model as it is now."""
        acc = self.accelerator or make_accelerator()
        self.model.eval()
        return {t: validation_loss(self.model, ex, self.batch_size, self.tokenizer.eos_token_id, acc)
                for t, ex in examples.items()}


def _targets(adapters: list) -> list[str]:
    return sorted({n.rpartition(".")[2] for a in adapters for n in a.modules})


# ------------------------------------------------------------------------------------------------------ CAT
def cat(adapters: list, data: FitData, rows: int, epochs: int, lr: float, init: float | None) -> tuple:
    n = len(adapters)
    init = 1.0 / n if init is None else float(init)
    adapters = merges.over_union(adapters)  # an adapter without a module: no branch there (rank 0)
    examples, spans = data.examples(rows)
    # rows mixed in the order of the task names, not of the list, so that listing the adapters in another order
    # trains on the same batches and permutes the learned alphas (up to float rounding of the stacked sum)
    mixed = [e for t in sorted(data.tasks) for e in examples[t]]
    model, pad = data.model, data.tokenizer.eos_token_id
    started = time.perf_counter()
    lora.inject(model, _targets(adapters))
    try:
        if len(data.tasks) != len(adapters):
            raise BadInput(f"{len(adapters)} adapters for the rows of {len(data.tasks)} tasks: give one adapter per task")
        for t, a in zip(data.tasks, adapters):
            lora.add_adapter(model, a, name=t)
        layers = lora.lora_layers(model)
        alphas = {}
        for name, layer in layers.items():  # a plain tensor gate: rank_weights reads it, autograd follows it
            alphas[name] = torch.full((n,), init, dtype=layer.factor_dtype, device=layer.base.weight.device,
                                      requires_grad=True)
            layer.gate = alphas[name]
        before = data.loss(examples)
        optimizer = torch.optim.AdamW(list(alphas.values()), lr=lr, weight_decay=0.0)
        loss_fn = TargetLoss(model)
        log = []
        bar = tqdm(total=epochs * math.ceil(len(mixed) / data.batch_size), desc="cat: alphas", unit="step", leave=False)
        for epoch in range(epochs):
            order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(data.seed * 1000 + epoch))
            for i in range(0, len(mixed), data.batch_size):
                chunk = [mixed[j] for j in order[i:i + data.batch_size].tolist()]
                batch = pad_batch([e["input_ids"] for e in chunk], pad, left=False, labels=[e["labels"] for e in chunk])
                total, count = loss_fn(**{k: v.to(model.device) for k, v in batch.items()})
                loss = total / count
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                log.append(round(loss.item(), 6))
                bar.update(1)
        bar.close()
        with torch.no_grad():
            after = data.loss(examples)
        weights = {name: a.detach().cpu().tolist() for name, a in alphas.items()}
    finally:
        for layer in lora.lora_layers(model).values():
            layer.gate = None
        lora.remove(model)
    merged = merges.check_finite(lora.Adapter({name: lora.concat([a.modules[name] for a in adapters], weights=weights[name])
                                       for name in sorted(adapters[0].modules)}, adapters[0].base_model), "cat")
    info = {"loss_before": before, "loss_after": after, "train_log": log, "alphas": weights,
            "rows_per_task": {t: len(e) for t, e in examples.items()}, "rows": spans,
            "fit_seconds": round(time.perf_counter() - started, 1)}
    return merged, info


# -------------------------------------------------------------------------------------------------- LoraHub
def lorahub(adapters: list, data: FitData, rows: int, budget: int, l1: float, bound: float) -> tuple:
    import nevergrad as ng
    import numpy as np

    n = len(adapters)
    examples, spans = data.examples(rows)
    started = time.perf_counter()
    history = []
    bar = tqdm(total=budget + 1, desc="lorahub: weights", unit="evaluation", leave=False)

    def objective(w) -> float:
        merged = merges.merge(adapters, "weight_sum", weights=[float(x) for x in w])
        with torch.no_grad(), lora.folded(data.model, merged):
            losses = data.loss(examples)
        value = sum(losses.values()) / len(losses) + l1 * float(np.abs(w).sum())
        history.append({"w": [round(float(x), 6) for x in w], "loss": sum(losses.values()) / len(losses),
                        "objective": value})
        bar.update(1)
        return value

    start = np.zeros(n)
    objective(start)  # the starting point (w = 0, the base model), so the result is never worse than it
    parametrization = ng.p.Array(init=start, lower=-bound, upper=bound)
    parametrization.random_state = np.random.RandomState(data.seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)
    optimizer.minimize(objective)
    bar.close()
    best = min(history, key=lambda h: h["objective"])
    merged = merges.merge(adapters, "weight_sum", weights=best["w"])
    info = {"weights": best["w"], "objective_start": history[0]["objective"], "objective_best": best["objective"],
            "loss_start": history[0]["loss"], "loss_best": best["loss"], "evaluations": len(history),
            "rows_per_task": {t: len(e) for t, e in examples.items()}, "rows": spans, "history": history,
            "fit_seconds": round(time.perf_counter() - started, 1)}
    return merged, info


# -------------------------------------------------------------------------------------------------- RegMean
def gram_matrices(model, adapter: lora.Adapter, examples: list, batch_size: int, pad_id: int) -> dict:
    """{module: X^T X} in float64 over the inputs X (tokens x d_in) that every module of `adapter` receives on
    every non-pad token (prompt, target and EOS) of `examples`, with the adapter folded into the model: the inputs of
    that task's fine-tuned model, as RegMean takes them. Modules fed the same tensor (q, k and v take one hidden
    state) share one matrix, computed once. One task's Grams: the per-task form of RegMean (n of these held at
    once), the reference `regmean_pass`'s summed statistics are tested and benchmarked against."""
    linears = lora.fold_targets(model, adapter)
    names = list(linears)
    sums, alias, mask = {}, {}, {}

    def new(i, x):
        flat = x[mask["tokens"]].double()
        sums[names[i]] = sums.get(names[i], 0) + flat.T @ flat

    handles = lora.hook_distinct_inputs(list(linears.values()), new, lambda i, j: alias.update({names[i]: names[j]}))
    try:
        with torch.no_grad(), lora.folded(model, adapter):
            model.eval()
            for i in range(0, len(examples), batch_size):
                batch = pad_batch([e["input_ids"] for e in examples[i:i + batch_size]], pad_id, left=False)
                mask["tokens"] = batch["attention_mask"].bool().to(model.device)
                model(**{k: v.to(model.device) for k, v in batch.items()})
    finally:
        for h in handles:
            h.remove()
    return {name: sums[alias.get(name, name)] for name in linears}


@dataclass
class ModelInput:
    """One distinct input of the adapted modules, in the order the forward pass reaches it: the modules that read it
    (q, k and v one hidden state; gate and up another) and its width."""
    modules: list
    d_in: int


def model_inputs(model, adapter: lora.Adapter) -> list[ModelInput]:
    """The distinct inputs of the adapter's modules in forward order, from one forward pass over two tokens (which
    module reads which tensor is the architecture's, not the data's)."""
    linears = lora.fold_targets(model, adapter)
    names, found = list(linears), []
    handles = lora.hook_distinct_inputs(
        list(linears.values()), lambda i, x: found.append(ModelInput([names[i]], x.shape[-1])),
        lambda i, j: found[-1].modules.append(names[i]))
    try:
        with torch.no_grad():
            model(input_ids=torch.ones(1, 2, dtype=torch.long, device=model.device))
    finally:
        for h in handles:
            h.remove()
    return found


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


@dataclass
class GramPlan:
    """How RegMean's statistics are collected within a memory budget: the inputs of each pass over the rows, in
    forward order. Per input (float64): S, d_in^2; the n task diagonals, n d_in; each module's G_i A_i^T, R d_in
    (R = sum_i r_i). Solving one input at an alpha adds G' and its Cholesky factor, 2 d_in^2. With several passes
    the merged A factors of every alpha that may be tried are kept instead of the statistics: R d_in each."""
    inputs: list                # ModelInput, forward order
    passes: list                # [[input index, ...], ...]
    bytes_per_input: list
    workspace: int              # the largest solve's G' and factor, the folded weights' copy, the merged factors
    budget: int
    budget_source: str

    def describe(self, n: int) -> str:
        held = max(sum(self.bytes_per_input[i] for i in p) for p in self.passes) + self.workspace
        total = sum(self.bytes_per_input)
        return (f"regmean: {n} adapters, {len(self.inputs)} distinct inputs (d_in {min(i.d_in for i in self.inputs)}"
                f"-{max(i.d_in for i in self.inputs)}): {_gb(total)} of summed Gram statistics (float64; the same "
                f"for any number of adapters but for n d_in + R d_in per input), at most {_gb(held)} held with the "
                f"solve, the folded weights and the merged factors; budget {_gb(self.budget)} ({self.budget_source}): "
                + ("one pass over each adapter's rows" if len(self.passes) == 1 else
                   f"{len(self.passes)} passes over each adapter's rows (layer groups of "
                   f"{min(map(len, self.passes))}-{max(map(len, self.passes))} inputs)"))


def plan_passes(inputs: list, adapters: list, memory_gb: float | None, device, model=None,
                alphas: int = 1) -> GramPlan:
    """Group the inputs (consecutive in forward order) into as few passes as fit the budget: `memory_gb`, or 80% of
    the memory free now on the model's device (after the model loaded). Besides the statistics and the solve, the
    budget holds a reserve: the copy of every adapted weight that folding an adapter in keeps (when `model` is
    given) and the merged factors of up to `alphas` alphas. Refuses in one line when the statistics of a single
    input cannot fit."""
    n = len(adapters)
    ranks = {name: sum(a.modules[name].A.shape[0] for a in adapters) for name in adapters[0].modules}
    per_input = [8 * (i.d_in ** 2 + n * i.d_in + sum(ranks[m] for m in i.modules) * i.d_in) for i in inputs]
    first = adapters[0].modules
    merged = sum(4 * ranks[m] * (f.A.shape[1] + f.B.shape[0]) for m, f in first.items())   # float32 A and B
    folded = 0 if model is None else sum(w.numel() * w.element_size() for w in
                                         (linear.weight for linear in lora.fold_targets(model, adapters[0]).values()))
    workspace = 2 * 8 * max(i.d_in for i in inputs) ** 2 + folded + alphas * merged
    if memory_gb is not None:
        budget, source = int(memory_gb * 1e9), "regmean.memory"
    elif torch.device(device).type == "cuda":
        budget, source = int(0.8 * torch.cuda.mem_get_info(device)[0]), "80% of the GPU memory free"
    else:
        import psutil

        budget, source = int(0.8 * psutil.virtual_memory().available), "80% of the memory available"
    worst = max(range(len(inputs)), key=lambda i: per_input[i])
    if per_input[worst] + workspace > budget:
        raise BadInput(f"regmean needs {_gb(per_input[worst] + workspace)} for the Gram statistics of one input "
                       f"({', '.join(inputs[worst].modules[:3])}: d_in {inputs[worst].d_in}) and its solve, more than "
                       f"the budget of {_gb(budget)} ({source}): raise --memory GB (full_evaluation.py: --set "
                       "regmean.memory=GB) where the machine has it, or merge adapters of fewer modules")
    passes, size = [[]], 0
    for i, b in enumerate(per_input):
        if passes[-1] and size + b + workspace > budget:
            passes.append([])
            size = 0
        passes[-1].append(i)
        size += b
    return GramPlan(inputs, passes, per_input, workspace, budget, source)


class _StopForward(Exception):
    """Raised after the last module a pass collects: the layers after it would compute nothing used."""


def regmean_pass(model, adapters: list, examples: list, inputs: list, batch_size: int, pad_id: int,
                 dtype: torch.dtype = torch.float64) -> tuple:
    """({first module of each input: merges.RegMeanInput}, {module: [G_i A_i^T per task]}) for `inputs`, summed
    over the tasks while each task's rows run through its own model (its adapter folded in): no G_i is ever held, so
    memory does not grow with the number of adapters. The forward stops after the last module of `inputs`.

    Precision: the sums live in float64 on the model's device, and each batch's products X^T X and X^T (X A^T) are
    taken in `dtype`, float64 by default on every device. In float32 (TF32 off) each Gram entry of a batch of n tokens
    is within gamma_n sqrt(G_jj G_kk) of the exact one (gamma_n = n u / (1 - n u), u = 2^-24: 1.5e-5 at n = 256;
    the rounding bound of a dot product, with Cauchy-Schwarz), which tests/test_merge_fit.py checks; but the solve
    multiplies a relative change of G' by up to its condition number, and the Grams of real layer inputs are
    ill-conditioned (feature energies spread over orders of magnitude; alpha 1 adds nothing to the diagonal), so the
    merge is kept exact at the cost of float64 products: on datacenter GPUs float64 runs at the float32 rate without
    tensor cores (H100, A100), and the products are a small part of the pass's time next to the forward."""
    device = model.device
    stats, projected = _empty_statistics(inputs, adapters, device)
    last = inputs[-1].modules[-1]
    for t, (adapter, rows) in enumerate(zip(adapters, examples)):
        linears = lora.fold_targets(model, adapter)
        cur = {}

        def stop(module, args):
            raise _StopForward

        handles = _statistics_hooks(linears, inputs, adapter, t, (stats, projected), cur, dtype)
        handles.append(linears[last].register_forward_pre_hook(stop))   # runs after the hook above
        try:
            with torch.no_grad(), lora.folded(model, adapter):
                model.eval()
                for i in range(0, len(rows), batch_size):
                    batch = pad_batch([e["input_ids"] for e in rows[i:i + batch_size]], pad_id, left=False)
                    cur["mask"] = batch["attention_mask"].bool().to(device)
                    try:
                        model(**{k: v.to(device) for k, v in batch.items()})
                    except _StopForward:
                        pass
        finally:
            for h in handles:
                h.remove()
    return stats, projected


def _empty_statistics(inputs: list, adapters: list, device) -> tuple:
    """Zeroed RegMean statistics for `inputs`: ({first module of each input: RegMeanInput}, {module: [None] * n})."""
    n = len(adapters)
    stats = {inp.modules[0]: merges.RegMeanInput(torch.zeros(inp.d_in, inp.d_in, dtype=torch.float64, device=device),
                                                 torch.zeros(n, inp.d_in, dtype=torch.float64, device=device))
             for inp in inputs}
    return stats, {m: [None] * n for inp in inputs for m in inp.modules}


def _statistics_hooks(linears: dict, inputs: list, adapter: lora.Adapter, t: int, sums: tuple, cur: dict,
                      dtype: torch.dtype) -> list:
    """Forward pre-hooks adding task t's share to the statistics `sums` = (stats, projected) of `inputs` (S,
    diag(G_t), G_t A_m^T per module) from every input their modules receive, on the tokens of cur["mask"]. Returns
    the handles, to remove."""
    stats, projected = sums
    key = {m: inp.modules[0] for inp in inputs for m in inp.modules}
    names = list(key)
    device = next(iter(stats.values())).summed.device
    A = {m: adapter.modules[m].A.to(device, dtype) for m in names}
    for m in names:
        projected[m][t] = torch.zeros(A[m].shape[1], A[m].shape[0], dtype=torch.float64, device=device)

    def project(m):
        projected[m][t] += cur["flat"].T @ (cur["flat"] @ A[m].T)

    def new(i, x):
        cur["flat"] = flat = x[cur["mask"]].to(dtype)
        s = stats[key[names[i]]]
        if dtype == torch.float64:
            s.summed.addmm_(flat.T, flat)   # in place: no d_in x d_in temporary beside the sum
        else:
            s.summed += flat.T @ flat       # a float32 product, summed in float64
        s.diagonals[t] += (flat * flat).sum(0)
        project(names[i])

    return lora.hook_distinct_inputs([linears[m] for m in names], new, lambda i, j: project(names[i]))


def solve_statistics(adapters: list, inputs: list, sums: tuple, alpha: float, rank: int | None) -> dict:
    """{module: merged Lora} for every module of `inputs` from the statistics `sums` = (stats, projected):
    merges.regmean_solve at alpha (and rank), one Cholesky factor per input, shared by the modules reading it."""
    stats, projected = sums
    out = {}
    for inp in inputs:
        factor = merges.regmean_factor(stats[inp.modules[0]], alpha)
        for m in inp.modules:
            out[m] = merges.regmean_solve([a.modules[m] for a in adapters], stats[inp.modules[0]], projected[m],
                                          alpha, factor, rank)
    return out


def reachable(param: registry.Param) -> list:
    """Every value `choose` may try for a parameter searched alone: its grid and the extensions past either end."""
    values = list(param.grid)
    for end in (min, max):
        value = end(values)
        for _ in range(MAX_EXTENSIONS):
            value = beyond_edge(param, value, values)
            if value is None:
                break
            values.append(value)
    return values


def regmean(adapters: list, data: FitData, rows: int, memory: float | None = None, alpha: float | None = None,
            rank: int | None = None) -> tuple:
    """RegMean's statistics: the summed Gram matrices of the tasks' inputs at every adapted module, each task's
    from the first `rows` rows its adapter trained on, run through its own fine-tuned model. Returns (merge at
    parameters -> Adapter, info); build chooses alpha on validation rows (the rows after the training rows) like any
    grid. When the statistics do not fit the memory budget at once (`plan_passes`), they are collected for a group
    of inputs per pass, and each pass solves every alpha the search may try (`reachable`) before its statistics
    are dropped (only `alpha`, when it is given); an alpha outside those costs the passes again. `rank`: every
    merge is RegMean's best LoRA of at most that rank (merges.regmean_truncate), alpha chosen for it."""
    adapters = merges.over_union(adapters)   # a task's Grams are collected at every module of the union
    examples, spans = data.training_examples(rows)
    examples = [examples[t] for t in data.tasks]
    started = time.perf_counter()
    inputs = model_inputs(data.model, adapters[0])
    candidates = [alpha] if alpha is not None else reachable(registry.get_method("regmean").params["alpha"])
    plan = plan_passes(inputs, adapters, memory, data.model.device, data.model)
    if len(plan.passes) > 1:   # in passes every alpha that may be tried is solved and kept: reserve room for them
        plan = plan_passes(inputs, adapters, memory, data.model.device, data.model, alphas=len(candidates))
    print(plan.describe(len(adapters)), flush=True)
    names = sorted(adapters[0].modules)
    solved = {}   # alpha -> {module: merged Lora}

    def solve_inputs(pass_inputs: list, stats: dict, projected: dict, alpha: float):
        solved.setdefault(alpha, {}).update(solve_statistics(adapters, pass_inputs, (stats, projected), alpha, rank))

    def solve(alphas: list):
        bar = tqdm(total=len(plan.passes) * len(adapters), desc="regmean: Gram statistics", unit="task", leave=False)
        for group in plan.passes:
            pass_inputs = [inputs[i] for i in group]
            stats, projected = regmean_pass(data.model, adapters, examples, pass_inputs, data.batch_size,
                                            data.tokenizer.eos_token_id)
            bar.update(len(adapters))
            for alpha in alphas:
                solve_inputs(pass_inputs, stats, projected, alpha)
            if len(plan.passes) == 1:   # one pass: keep the statistics and solve each alpha when asked
                kept.update(stats=stats, projected=projected)
            del stats, projected
        bar.close()

    kept = {}
    solve([] if len(plan.passes) == 1 else candidates)

    def make(params: dict) -> lora.Adapter:
        alpha = params["alpha"]
        if alpha not in solved:
            if kept:
                solve_inputs(inputs, kept["stats"], kept["projected"], alpha)
            else:
                solve([alpha])
        merged = lora.Adapter({name: solved[alpha][name] for name in names}, adapters[0].base_model)
        if kept:
            del solved[alpha]   # one pass: solving again is cheap, holding every alpha's factors is not needed
        return merges.check_finite(merged, "regmean")

    tokens = {t: sum(len(e["input_ids"]) for e in ex) for t, ex in zip(data.tasks, examples)}
    return make, {"gram_rows": spans, "gram_tokens": tokens, "gram_seconds": round(time.perf_counter() - started, 1),
                  "gram_memory": {"statistics_bytes": sum(plan.bytes_per_input), "solve_bytes": plan.workspace,
                                  "budget_bytes": plan.budget, "passes": len(plan.passes)}}


# ------------------------------------------------------------------------------------------------ RegMean++
def decoder_blocks(model, inputs: list) -> list:
    """[(block, [ModelInput of that block])] for every block of the model's layer stack (the nn.ModuleList whose
    children hold the adapted modules), in forward order: the blocks RegMean++ merges one after another. Refuses in
    one line a model whose layers take different attention masks (sliding-window layer types): one block's
    arguments are reused for every block."""
    names = inputs[0].modules[0].split(".")
    stack = next((".".join(names[:k]) for k in range(1, len(names))   # the outermost list: the layers, not experts
                  if isinstance(model.get_submodule(".".join(names[:k])), torch.nn.ModuleList)), None)
    if stack is None:
        raise BadInput(f"regmean_pp: {inputs[0].modules[0]} is in no stack of layers (nn.ModuleList): use regmean")
    if len(set(getattr(model.config, "layer_types", None) or ["one"])) > 1:
        raise BadInput(f"regmean_pp: the model's layers have several attention types ({model.config.layer_types}), "
                       "whose masks differ: use regmean")
    layers = model.get_submodule(stack)
    per_block = {i: [] for i in range(len(layers))}
    for inp in inputs:
        index = inp.modules[0][len(stack) + 1:].split(".")[0] if inp.modules[0].startswith(stack + ".") else ""
        if not index.isdigit():
            raise BadInput(f"regmean_pp: {inp.modules[0]} is outside the layer stack {stack}: use regmean")
        per_block[int(index)].append(inp)
    return [(layers[i], per_block[i]) for i in range(len(layers))]


@torch.no_grad()
def block_inputs(model, first_block, examples: list, batch_size: int, pad_id: int) -> list:
    """[(hidden states, the block's other arguments, non-pad token mask)] per batch of `examples`: what the first
    block receives (the embeddings; position embeddings and attention mask as the model builds them), the forward
    stopped there. use_cache is off, so calling a block again changes no cache."""
    device, out, seen = model.device, [], {}

    def grab(module, args, kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise _StopForward

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.eval()
        for i in range(0, len(examples), batch_size):
            batch = pad_batch([e["input_ids"] for e in examples[i:i + batch_size]], pad_id, left=False)
            try:
                model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            except _StopForward:
                pass
            args, kwargs = seen["args"], dict(seen["kwargs"])
            hidden = args[0] if args else kwargs.pop("hidden_states")
            out.append((hidden, kwargs, batch["attention_mask"].bool().to(device)))
    finally:
        handle.remove()
    return out


def _run_block(block, states: list) -> list:
    """The block applied to every batch of `states`, [(its output, the same arguments, the same mask)]."""
    out = []
    for hidden, kwargs, mask in states:
        y = block(hidden, **kwargs)
        out.append((y[0] if isinstance(y, tuple) else y, kwargs, mask))
    return out


@torch.no_grad()
def regmean_pp_merge(model, adapters: list, examples: list, batch_size: int, pad_id: int, alpha: float,
                     rank: int | None = None) -> dict:
    """{module: Lora} of RegMean++ (Nguyen et al., 2025): RegMean block by block in forward order, each block's
    Gram matrices taken on the inputs the merged model gives it. For block l and task i, X_i^(l) is what task i's
    own block l receives (its adapter folded into that block only) when task i's rows come through the merged
    blocks 1..l-1; block l is then merged by RegMean's solve on those statistics (at `rank`, its best LoRA of that
    rank: merges.regmean_truncate), and the rows go on through the merged block l. The first adapted block's
    Grams are RegMean's; the later ones see what the merge of the earlier ones (and its truncation) changed.
    Memory: every row's hidden states (tokens x d_model per task, twice while a block runs) besides one block's
    statistics; no budget is checked (RegMean's `memory` plans the statistics, which are not what grows here)."""
    device = model.device
    inputs = model_inputs(model, adapters[0])
    blocks = decoder_blocks(model, inputs)
    states = [block_inputs(model, blocks[0][0], rows, batch_size, pad_id) for rows in examples]
    last = max(i for i, (_, block_in) in enumerate(blocks) if block_in)
    merged = {}
    for block, block_in in tqdm(blocks[:last + 1], desc="regmean_pp: blocks", unit="block", leave=False):
        if block_in:
            names = [m for inp in block_in for m in inp.modules]
            stats, projected = _empty_statistics(block_in, adapters, device)
            for t, adapter in enumerate(adapters):
                own = lora.Adapter({m: adapter.modules[m] for m in names}, adapter.base_model)
                cur = {}
                handles = _statistics_hooks(lora.fold_targets(model, own), block_in, own, t, (stats, projected),
                                            cur, torch.float64)
                try:
                    with lora.folded(model, own):
                        for hidden, kwargs, mask in states[t]:
                            cur["mask"] = mask
                            block(hidden, **kwargs)
                finally:
                    for h in handles:
                        h.remove()
            merged.update(solve_statistics(adapters, block_in, (stats, projected), alpha, rank))
            del stats, projected
            if block is blocks[last][0]:
                break   # nothing after it is merged: its outputs are not needed
            with lora.folded(model, lora.Adapter({m: merged[m] for m in names}, adapters[0].base_model)):
                states = [_run_block(block, st) for st in states]
        else:
            states = [_run_block(block, st) for st in states]
    return merged


def regmean_pp(adapters: list, data: FitData, rows: int, alpha: float | None = None,
               rank: int | None = None) -> tuple:
    """RegMean++'s merge at parameters -> Adapter, and its info: the Gram rows are RegMean's (the first `rows` rows
    each adapter trained on), but every alpha is a pass of its own through the blocks (the statistics of block l
    depend on the merge of the blocks before it), so a search over alpha costs one such pass per candidate: fix
    alpha (`--set regmean_pp.alpha=...`) to pay one."""
    adapters = merges.over_union(adapters)
    examples, spans = data.training_examples(rows)
    examples = [examples[t] for t in data.tasks]
    seconds, last = [], {}

    def make(params: dict) -> lora.Adapter:
        if last.get("alpha") != params["alpha"]:   # build asks again for the alpha its search chose: not a new pass
            started = time.perf_counter()
            merged = regmean_pp_merge(data.model, adapters, examples, data.batch_size, data.tokenizer.eos_token_id,
                                      params["alpha"], rank)
            seconds.append(round(time.perf_counter() - started, 1))
            last.update(alpha=params["alpha"], adapter=merges.check_finite(
                lora.Adapter(dict(sorted(merged.items())), adapters[0].base_model), "regmean_pp"))
        return last["adapter"]

    tokens = {t: sum(len(e["input_ids"]) for e in ex) for t, ex in zip(data.tasks, examples)}
    return make, {"gram_rows": spans, "gram_tokens": tokens, "pass_seconds": seconds}


# ---------------------------------------------------------------------------------------------- build a merge
MAX_EXTENSIONS = 8   # candidates added past the ends of a grid at most (halving 8 times: 1/256 of the grid's end)


def beyond_edge(param: registry.Param, best, tried: list):
    """The next value past the end of `tried` where `best` sits (a float: half the smallest, twice the largest; an
    int: one past), if that value is in the parameter's range; None when the best is inside the values tried, or
    the range ends there (density 1: the optimum at the end of what the method allows is no artifact of a grid)."""
    if best is None or best <= 0 or min(tried) == max(tried) or best not in (min(tried), max(tried)):
        return None  # the grids are positive scales and shares; at 0 or below, halving is no step
    up = best == max(tried)
    value = (best + 1 if up else best - 1) if param.kind is int else (best * 2 if up else best / 2)
    try:
        return param.check("", "", value)
    except BadInput:
        return None


def needs_rows(name: str, select_rows: int, fixed: dict | None = None) -> bool:
    """Whether building merge `name` reads rows: a data method always, a grid method unless its grid is fixed."""
    method = registry.get_method(registry.split_rank(name)[0])
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    return method.space == "data" or (select_rows > 0 and any(p.grid and k not in fixed
                                                              for k, p in method.params.items()))


def merge_rank(method: registry.Method, suffix: int | None, fixed: dict, options: dict) -> int | None:
    """The rank a merge is truncated to, from wherever it was given: the name's suffix (`ties_r8`), `--set
    ties.rank=8` (in `fixed`) or merge_adapters.py's --rank (in `options`), taken out of `fixed` and `options`
    unless it is the method's own parameter (svd, regmean). Two different ranks for one merge are refused."""
    own = "rank" in method.params
    rank = registry.one_rank(method.name, {
        f"the name's suffix _r{suffix}": suffix, "the options' rank": options.pop("rank", None),
        "the parameters' rank": fixed.get("rank") if own else fixed.pop("rank", None)})
    if rank is not None and own:
        fixed["rank"] = rank
        return None   # the method's own parameter does it
    return rank


def build(name: str, adapters: list, data: FitData | None, select_rows: int, fixed: dict | None = None,
          seed: int = 0, options: dict | None = None) -> tuple:
    """The merged adapter of method `name` and what was done to get it: parameters (fixed ones as given, grids
    searched on the validation rows by mean target-token loss), the losses of every candidate, and the time.
    `options`: further arguments of merges.merge for every candidate of a data-free method (weights, rank), so the
    choice is made on the merge that is returned. A data method without a grid (CAT, LoraHub) is its fit; one with
    a grid (RegMean's alpha) fits its statistics once, and its grid is searched like a data-free method's.
    A rank variant (`<method>_r<k>`, or a rank in `fixed` or `options`) is the method's merge truncated to rank k
    (`merge_rank`): by its own parameter (svd, regmean), by merges.merge (the data-free methods, every grid
    candidate truncated before it is scored), or after the fit (CAT, LoraHub: merges.truncate)."""
    base, suffix = registry.split_rank(name)
    method = registry.get_method(base)
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    options = dict(options or {})
    rank = merge_rank(method, suffix, fixed, options)
    if options and method.space == "data":
        raise BadInput(f"{base} learns its own weights: it takes no {', '.join(options)}")
    started = time.perf_counter()
    grids = {k: p.grid for k, p in method.params.items() if p.grid and k not in fixed}
    info = {} if rank is None else {"rank": rank}
    if method.space == "data":
        if data is None:
            raise BadInput(f"{base} learns from train rows: it needs the model and data")
        params = registry.resolve_params(method, fixed)
        if not any(p.grid for p in method.params.values()):
            merged, info = method.function(adapters, data, **params)
            merged = merged if rank is None else merges.truncate(merged, rank)
            return merged, {"params": params, **info, **({"rank": rank} if rank else {}),
                            "seconds": round(time.perf_counter() - started, 1)}
        # the fit learns its statistics once; a grid value that will not be searched (given, or no search) is
        # passed too, so RegMean in layer groups solves only that alpha instead of every one a search could try
        search = bool(grids) and select_rows > 0
        make, info = method.function(adapters, data, **{k: v for k, v in params.items()
                                                 if not method.params[k].grid or k in fixed or not search})
    else:
        extra = {**options, **({"seed": seed} if method.seeded else {}), **({"rank": rank} if rank else {})}

        def make(params: dict) -> lora.Adapter:   # every candidate merged alike
            return merges.merge(adapters, base, **extra, **params)
    if not grids or data is None or select_rows <= 0:
        params = registry.resolve_params(method, fixed)
        return make(params), {"params": params, **info, "seconds": round(time.perf_counter() - started, 1)}
    params, selection = choose(name, method.params, fixed, lambda p: lora.folded(data.model, make(p)), data,
                               select_rows)
    return make(params), {"params": params, **info, "selection": selection,
                          "seconds": round(time.perf_counter() - started, 1)}


def choose(name: str, specs: dict, fixed: dict, apply, data: FitData, select_rows: int) -> tuple:
    """(parameters, selection): every candidate of the grids of `specs` ({parameter: registry.Param}) not in `fixed`,
    applied to the model by the context `apply(parameters)` (a merge folded in, Arrow's routing), scored by the mean
    target-token loss over tasks on `select_rows` validation rows per task; the grid extended past an end while
    the best sits there."""
    grids = {k: p.grid for k, p in specs.items() if p.grid and k not in fixed}
    examples, spans = data.examples(select_rows)
    candidates = []
    bar = tqdm(desc=f"{name}: grid", unit="candidate", leave=False)

    def evaluate(values: dict):
        params = {k: p.check(name, k, {**fixed, **values}.get(k, p.default)) for k, p in specs.items()}
        if any(c["params"] == params for c in candidates):
            return
        with torch.no_grad(), apply(params):
            losses = data.loss(examples)
        candidates.append({"params": params, "val_loss": sum(losses.values()) / len(losses),
                           "per_task": {t: round(v, 6) for t, v in losses.items()}})
        bar.update(1)

    for values in itertools.product(*grids.values()):
        evaluate(dict(zip(grids, values)))
    for _ in range(MAX_EXTENSIONS):
        best = min(candidates, key=lambda c: c["val_loss"])
        step = next(((k, v) for k in grids if (v := beyond_edge(specs[k], best["params"][k],
                                                                [c["params"][k] for c in candidates])) is not None),
                    None)
        if step is None:
            break
        evaluate({**{k: best["params"][k] for k in grids}, step[0]: step[1]})
    bar.close()
    best = min(candidates, key=lambda c: c["val_loss"])
    at_edge = [k for k in grids if beyond_edge(specs[k], best["params"][k],
                                               [c["params"][k] for c in candidates]) is not None]
    return best["params"], {"rows_per_task": select_rows, "rows": spans,
                            "criterion": "mean over tasks of the target-token loss", "candidates": candidates,
                            "at_edge": at_edge}
