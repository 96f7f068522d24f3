"""The figures of visualize_lora.ipynb, drawn from results/ (and adapters/ for the geometry).

Each `fig_*` function takes what it plots and returns a matplotlib Figure; `save` writes it as a PNG. The notebook
loads the inputs once (`load_results`, `load_adapters`, `load_train_logs`) and calls these.
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the notebook shows the saved figures inline all the same
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import lora  # noqa: E402
from .lowrank import truncated_svd  # noqa: E402
from . import merges  # noqa: E402
from . import peft_files  # noqa: E402
from . import registry  # noqa: E402
from .layout import ordered  # noqa: E402
from .reporting import intervals, load_method_results, paper_normalized, same_inputs, seed_spread  # noqa: E402
from .metrics import normalized_score  # noqa: E402
from .tasks import get_task  # noqa: E402


def load_results(results_root: Path, model: str) -> dict:
    """{n_tasks: {method: result json}} for every results/<model>/<n>-task folder."""
    out = {}
    for folder in sorted(Path(results_root, model).glob("*-task")):
        methods = load_method_results(folder)
        if methods:
            out[int(folder.name.split("-")[0])] = same_inputs(methods)[0]  # the summary's rows, no others
    return out


def normalized(results: dict) -> dict:
    """{method: {"per_task": ratios, "mean": normalized score, "ci": its 95% paired bootstrap interval}} for one
    task set, for the methods scored on every task (not majority); needs the single run."""
    tasks = results["single"]["tasks"]
    primary = {t: get_task(t).primary for t in tasks}
    ci = intervals(results)
    return {m: {**normalized_score(r["metrics"], results["single"]["metrics"], primary), "ci": ci[m]["normalized"]}
            for m, r in results.items() if set(r["metrics"]) == set(tasks)}


def save(fig, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def fig_normalized(results: dict, paper_model: str = "Qwen2-1.5B"):
    sets = sorted(results)
    width = max(6.0, 0.42 * max(len(r) for r in results.values()))
    fig, axes = plt.subplots(len(sets), 1, figsize=(width, 4.2 * len(sets)), squeeze=False, layout="constrained")
    axes = axes.T
    for ax, n in zip(axes[0], sets):
        norm = normalized(results[n])
        paper = paper_normalized(results[n]["single"]["tasks"]).get(paper_model, {})
        methods = ordered(norm)
        x = np.arange(len(methods))
        ours = np.array([norm[m]["mean"] or 0 for m in methods])
        ci = np.array([norm[m]["ci"] or (norm[m]["mean"] or 0,) * 2 for m in methods])
        ax.bar(x - 0.2, ours, 0.4, label="ours (95% paired bootstrap interval)",
               yerr=np.stack([ours - ci[:, 0], ci[:, 1] - ours]), capsize=3)
        ax.bar(x + 0.2, [paper.get(m) or 0 for m in methods], 0.4, label=f"paper ({paper_model})")
        ax.set_xticks(x, methods, rotation=40, ha="right")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("normalized score (method / single)")
        ax.set_title(f"{n}-task set")
        ax.legend()
    fig.suptitle("Normalized score per method")
    return fig


def fig_rank(folders):
    """Normalized score against the merge's rank, for every merge with rank variants (`<merge>_r<k>`: one LoRA of
    rank k): each variant at its k and the exact merge at the right end; the paper's SVD merge (rank 8) for
    reference. `folders`: one results folder, whose points carry their 95% paired bootstrap intervals, or one per
    training seed, each seed's points drawn faint and the mean over the seeds joined by a line (a point is drawn
    where every seed with variants scored it; a folder without any is left out). None without variants."""
    folders = [Path(folders)] if isinstance(folders, (str, Path)) else [Path(f) for f in folders]
    norms = [normalized(same_inputs(load_method_results(f))[0]) for f in folders]
    # a seed whose variants are not evaluated yet is left out, not made to hide the others'
    kept = [i for i, n in enumerate(norms) if any(registry.split_rank(m)[1] for m in n)]
    folders, norms = [folders[i] for i in kept], [norms[i] for i in kept]
    families = {}
    for norm in norms:
        for m in norm:
            base, k = registry.split_rank(m)
            if k is not None and all(m in n for n in norms):
                families.setdefault(base, set()).add(k)
    if not families:
        return None
    ranks = sorted(set().union(*families.values()))
    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    for shift, (base, ks) in zip(np.linspace(-0.1, 0.1, len(families)), sorted(families.items())):
        points = [(i, f"{base}_r{k}") for i, k in enumerate(ranks) if k in ks]
        points += [(len(ranks), base)] if all(base in n for n in norms) else []
        x = np.array([i for i, _ in points]) + shift
        y = np.array([[n[m]["mean"] for _, m in points] for n in norms])   # (seeds, points)
        if len(norms) == 1:
            ci = np.array([norms[0][m]["ci"] or (norms[0][m]["mean"],) * 2 for _, m in points])
            ax.errorbar(x, y[0], yerr=np.stack([y[0] - ci[:, 0], ci[:, 1] - y[0]]), fmt="o-", capsize=3, label=base)
            continue
        line, = ax.plot(x, y.mean(0), "o-", label=f"{base} (mean of {len(norms)} seeds)")
        for seed_points in y:
            ax.plot(x, seed_points, ".", color=line.get_color(), alpha=0.45)
    if 8 in ranks and all("svd" in n for n in norms):
        ax.plot([ranks.index(8)], [np.mean([n["svd"]["mean"] for n in norms])], "k*", markersize=10,
                label="svd (the paper's, rank 8)" + (f", mean of {len(norms)} seeds" if len(norms) > 1 else ""))
    ax.set_xticks(range(len(ranks) + 1), [str(k) for k in ranks] + ["exact"])
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    label = folders[0].parent.name if len(folders) == 1 else f"{len(folders)} seeds: " + ", ".join(
        f.parent.name for f in folders)
    ax.set(xlabel="rank of the merged LoRA (exact: RegMean's is the sum of the task ranks)",
           ylabel="normalized score (method / single)", title=f"One LoRA of a chosen rank ({label})")
    ax.legend(fontsize=8)
    return fig


def fig_seeds(model_dir: Path):
    """Each method's normalized score on every training seed (each seed normalized to its own single): seed 0 with
    its 95% row-bootstrap interval, the other seeds as points, the mean over the seeds it ran on as a bar; None with
    fewer than two seeds or no method scored on two (`reporting.seeds_table` says which)."""
    spread = {m: sp for m, sp in seed_spread(model_dir).items() if m != "single"}
    seeds = sorted({s for sp in spread.values() for s in sp["points"]})
    if len(seeds) < 2:
        return None
    methods = sorted(spread, key=lambda m: -spread[m]["mean"])
    x = np.arange(len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(methods)), 4.2), layout="constrained")
    ax.bar(x, [spread[m]["mean"] for m in methods], 0.6, color="lightgrey", label="mean over the seeds")
    for k, seed in enumerate(seeds):
        ran = [i for i, m in enumerate(methods) if seed in spread[m]["points"]]
        y = np.array([spread[methods[i]]["points"][seed] for i in ran])
        shift = (k - (len(seeds) - 1) / 2) * 0.15
        if seed == 0:
            ci = np.array([spread[methods[i]]["ci"][0] or (y[j],) * 2 for j, i in enumerate(ran)])
            ax.errorbar(x[ran] + shift, y, yerr=np.stack([y - ci[:, 0], ci[:, 1] - y]), fmt="o", color="black",
                        capsize=3, label="seed 0 (committed run), 95% row-bootstrap interval")
        else:
            ax.plot(x[ran] + shift, y, "o", mfc="none", label=f"seed {seed}")
    partial = [m for m in methods if len(spread[m]["points"]) < len(seeds)]
    ax.set_xticks(x, [m + (" *" if m in partial else "") for m in methods], rotation=40, ha="right")
    if partial:
        ax.set_xlabel("* without a score on every seed: mean over the seeds it scored on")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("normalized score (method / its seed's single)")
    ax.set_title(f"Training seeds: {len(seeds)} runs of the seven LoRAs and the router, 7 tasks")
    ax.legend(fontsize=8)
    return fig


def fig_heatmap(results: dict):
    sets = sorted(results)
    height = max(4.0, 0.32 * max(len(r) for r in results.values()) + 1.5)
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), height), squeeze=False, layout="constrained")
    for ax, n in zip(axes[0], sets):
        norm = normalized(results[n])
        tasks = results[n]["single"]["tasks"]
        methods = ordered(norm)
        grid = np.array([[norm[m]["per_task"][t] if norm[m]["per_task"][t] is not None else np.nan for t in tasks]
                         for m in methods])
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(1.2, np.nanmax(grid)))
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
        ax.set_yticks(range(len(methods)), methods)
        for i in range(len(methods)):
            for j in range(len(tasks)):
                ax.text(j, i, "n/a" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}", ha="center", va="center",
                        color="white" if not np.isnan(grid[i, j]) and grid[i, j] < 0.6 else "black", fontsize=8)
        ax.set_xlabel("task")
        ax.set_ylabel("method")
        ax.set_title(f"{n}-task set: per-task score / single")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("Normalized per-task score (method x task)")
    return fig


def fig_router(results: dict):
    sets = [n for n in sorted(results) if "moa" in results[n]]
    fig, axes = plt.subplots(2, len(sets), figsize=(6 * len(sets), 9), squeeze=False, layout="constrained")
    for col, n in enumerate(sets):
        router = results[n]["moa"]["router"]
        tasks = router["confusion"]["rows_true_cols_routed"]
        counts = np.array(router["confusion"]["counts"], dtype=float)
        share = counts / counts.sum(1, keepdims=True)
        ax = axes[0, col]
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("routed task")
        ax.set_ylabel("true task")
        ax.set_title(f"{n}-task MoA: routing decisions (all layers), accuracy {router['accuracy']:.2f}")
        ax = axes[1, col]
        per_layer = router["per_layer"]
        ax.plot(range(len(per_layer)), list(per_layer.values()), marker=".")
        ax.axhline(1 / len(tasks), color="grey", ls="--", lw=0.8, label="chance")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("adapted layer (in model order: layer x q, k, v, o)")
        ax.set_ylabel("routing accuracy")
        ax.set_title(f"{n}-task MoA: routing accuracy per layer")
        ax.legend()
    fig.suptitle("MoA router")
    return fig


# -------------------------------------------------------------------------------------------- adapter geometry
def load_adapters(adapters_root: Path, model: str, tasks: list[str]) -> dict | None:
    folder = Path(adapters_root, model)
    if not all((folder / t / "adapter_model.safetensors").exists() for t in tasks):
        return None
    return {t: peft_files.load_adapter(folder / t) for t in tasks}


def frobenius_inner(a: lora.Lora, b: lora.Lora) -> float:
    """<s_a B_a A_a, s_b B_b A_b>_F from the factors: sum((B_a^T B_b) * (A_a A_b^T)), no dense matrix."""
    return float(a.scale * b.scale * ((a.B.double().T @ b.B.double()) * (a.A.double() @ b.A.double().T)).sum())


def update_norm_ratios(adapters: dict, tasks: list[str], methods=("concat", "weight_sum", "svd")) -> dict:
    """For each merge (at its default parameters): ||merged update||_F / mean_i ||task update||_F, averaged over
    modules (how far a merge moves W compared with one task's LoRA)."""
    loras = [adapters[t] for t in tasks]
    out = {}
    for method in methods:
        merged = merges.merge(loras, method)
        ratios = [np.sqrt(frobenius_inner(m, m)) / np.mean([np.sqrt(frobenius_inner(a.modules[n], a.modules[n]))
                                                            for a in loras])
                  for n, m in merged.modules.items()]
        out[method] = float(np.mean(ratios))
    return out


def mean_spectrum(adapter, names: list) -> np.ndarray:
    """The singular values of each named module's update s B A, averaged over the modules."""
    return np.mean([truncated_svd(f.scale * f.B.double(), f.A)[1].numpy() for f in map(adapter.modules.get, names)], 0)


def fig_spectra(adapters: dict, rank: int = 8):
    tasks = list(adapters)
    targets = sorted({n.rpartition(".")[2] for n in adapters[tasks[0]].modules})
    fig, axes = plt.subplots(1, len(targets), figsize=(4 * len(targets), 3.6), squeeze=False, layout="constrained")
    merged = merges.merge([adapters[t] for t in tasks], "svd", rank=rank)
    for ax, target in zip(axes[0], targets):
        names = [n for n in adapters[tasks[0]].modules if n.endswith("." + target)]
        for t in tasks:
            ax.plot(mean_spectrum(adapters[t], names), marker=".", label=t)
        ax.plot(mean_spectrum(merged, names), "k--", marker="x", label="SVD merge")
        ax.set_yscale("log")
        ax.set_xlabel("singular value index")
        ax.set_ylabel("singular value (mean over layers)")
        ax.set_title(target)
    axes[0, -1].legend(fontsize=7)
    fig.suptitle("Spectra of the task updates s B A and of the SVD-merged update")
    return fig


def fig_interference(adapters: dict):
    tasks = list(adapters)
    names = list(adapters[tasks[0]].modules)
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in names})
    cos = np.zeros((len(layers), len(tasks), len(tasks)))
    for li, layer in enumerate(layers):
        mods = [n for n in names if f".layers.{layer}." in n]
        for i, a in enumerate(tasks):
            for j, b in enumerate(tasks):
                vals = []
                for n in mods:
                    la, lb = adapters[a].modules[n], adapters[b].modules[n]
                    vals.append(frobenius_inner(la, lb) / np.sqrt(frobenius_inner(la, la) * frobenius_inner(lb, lb)))
                cos[li, i, j] = np.mean(vals)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    mean = cos.mean(0)
    im = ax1.imshow(mean, cmap="coolwarm", vmin=-1, vmax=1)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            ax1.text(j, i, f"{mean[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax1.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax1.set_yticks(range(len(tasks)), tasks)
    ax1.set_title("cosine similarity of task updates (mean over layers)")
    fig.colorbar(im, ax=ax1, shrink=0.8)
    off = ~np.eye(len(tasks), dtype=bool)
    ax2.plot(layers, [np.abs(c[off]).mean() for c in cos], marker=".")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("mean |cosine| between different tasks")
    ax2.set_title("interference per layer")
    fig.suptitle("Pairwise similarity of the task updates s B A")
    return fig


# ---------------------------------------------------------------------------------------------- training logs
def load_train_logs(results_root: Path, adapters_root: Path, model: str, tasks: list[str]) -> dict:
    """{task: log rows} from adapters/<model>/<task>/train_log.jsonl, else results/<model>/train_logs/<task>.jsonl."""
    logs = {}
    for t in tasks:
        for path in (Path(adapters_root, model, t, "train_log.jsonl"), Path(results_root, model, "train_logs", f"{t}.jsonl")):
            if path.exists():
                logs[t] = [json.loads(line) for line in path.read_text().splitlines()]
                break
    return logs


def fig_losses(logs: dict):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, (task, rows) in enumerate(logs.items()):
        color = f"C{k}"
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=color, alpha=0.5, label=f"{task} train")
        val = [r for r in rows if "val_loss" in r]
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", color=color, label=f"{task} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on target tokens")
    ax.set_title("Training loss per task")
    ax.legend(fontsize=7, ncol=2)
    return fig


# ------------------------------------------------------------------------------------------ merge selection
def fig_selection(results: dict):
    """Validation loss of every candidate of the merges whose lambda / alpha was chosen on validation rows."""
    sets = sorted(results)
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 4.2), squeeze=False, layout="constrained")
    for ax, n in zip(axes[0], sets):
        for k, (m, r) in enumerate(r for r in results[n].items() if "selection" in r[1].get("merge", {})):
            grid = r["merge"]["selection"]["candidates"]
            name = next(p for p in ("lam", "alpha") if p in grid[0]["params"])
            xs, ys = [c["params"][name] for c in grid], [c["val_loss"] for c in grid]
            ax.plot(xs, ys, marker="o", color=f"C{k % 10}", ls="-" if k < 10 else "--", label=f"{m} ({name})")
            best = min(grid, key=lambda c: c["val_loss"])
            ax.plot([best["params"][name]], [best["val_loss"]], "k*", ms=10)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("lambda / alpha (log scale)")
        ax.set_ylabel("mean target-token loss, validation rows")
        ax.set_title(f"{n}-task set: candidates (star: chosen)")
        ax.legend(fontsize=7)
    fig.suptitle("Merge hyperparameters chosen on validation rows of the train split")
    return fig
