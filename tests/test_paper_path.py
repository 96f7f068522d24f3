"""The path researchers run on GPUs, tested on this CPU machine: bf16 numerics, exact restore of folded merges,
data parallelism over 2 processes (gloo) against 1, hub-shaped datasets, and errors that keep their cause."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny_model, tiny_qwen2
from src import cli
from src import lora
from src import merges
from src.errors import BadInput
from src.train import make_config

pytestmark = pytest.mark.slow   # subprocesses, the real model or the notebook: make test runs it, test-fast not

REPO = Path(__file__).resolve().parent.parent


def ids(n=4, t=16, seed=0):
    return torch.randint(3, 1000, (n, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------ bf16
def train_steps(model, steps: int, lr: float):
    """AdamW steps on next-token loss over fixed random batches; returns (initial factors, and per factor the
    entries that had a gradient above 1e-7 at some step: for those AdamW's step is about lr, far above float32's
    resolution and, for entries above 2^-6, below bf16's)."""
    from src.train import lm_loss

    lora.inject(model)
    lora.add_adapter(model, r=8, alpha=16, trainable=True, generator=torch.Generator().manual_seed(0))
    params = lora.adapter_parameters(model)
    init = [p.detach().clone() for p in params]
    touched = [torch.zeros_like(p, dtype=torch.bool) for p in params]
    opt = torch.optim.AdamW(params, lr=lr)
    for step in range(steps):
        x = ids(seed=step)
        labels = x.clone()
        labels[:, :8] = -100
        loss, _ = lm_loss(model, {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels})
        loss.backward()
        for t, p in zip(touched, params):
            t |= p.grad.abs() > 1e-7  # well above AdamW's eps: the step is about lr
        opt.step()
        opt.zero_grad()
    return init, touched


def test_bf16_base_keeps_float32_factors_that_train_like_the_float32_base():
    bf16 = tiny_qwen2().to(torch.bfloat16)
    init, touched = train_steps(bf16, steps=4, lr=5e-5)
    params = lora.adapter_parameters(bf16)
    assert all(p.dtype == torch.float32 for p in params)
    moved = torch.cat([(p != p0)[t] for p, p0, t in zip(params, init, touched)])
    # with bf16 factors the entries above 2^-6, a large share of A, would never move; here all do (up to a step
    # that an opposite step undoes to the last float32 bit, seen once in thousands)
    assert len(moved) > 1000 and moved.float().mean() >= 0.999
    layer = lora.lora_layers(bf16)["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        assert layer(torch.randn(2, 3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
        assert bf16(ids()).logits.dtype == torch.bfloat16

    # against the same training on the float32 base: the updates agree up to the bf16 forward's rounding (measured
    # here: median relative difference 0.06, worst 0.21, every cosine >= 0.977)
    fp32 = tiny_qwen2()
    init32, _ = train_steps(fp32, steps=4, lr=5e-5)
    relative = []
    for p, p0, q, q0 in zip(params, init, lora.adapter_parameters(fp32), init32):
        assert torch.equal(p0, q0)  # the same draw of A
        moved_bf16, moved_fp32 = (p.detach() - p0).flatten(), (q.detach() - q0).flatten()
        assert torch.nn.functional.cosine_similarity(moved_bf16, moved_fp32, dim=0) >= 0.95
        relative.append(((moved_bf16 - moved_fp32).norm() / moved_fp32.norm()).item())
    assert sorted(relative)[len(relative) // 2] <= 0.1


def test_bf16_fold_restores_w_bit_for_bit_and_methods_in_sequence_equal_fresh_models():
    gen = torch.Generator().manual_seed(3)
    x = ids()
    model = tiny_qwen2().to(torch.bfloat16)
    lora.inject(model)
    adapters = []
    for r in (4, 8, 8):
        modules = {n: lora.Lora(torch.randn(r, m.base.in_features, generator=gen) * 0.1,
                             torch.randn(m.base.out_features, r, generator=gen) * 0.1, 2.0)
                   for n, m in lora.lora_layers(model).items()}
        adapters.append(lora.Adapter(modules))
    lora.remove(model)
    original = {n: p.clone() for n, p in model.named_parameters()}
    merged_by = {"concat": merges.merge(adapters, "concat"), "svd": merges.merge(adapters, "svd", rank=8),
                 "weight_sum": merges.merge(adapters[1:], "weight_sum")}
    with torch.no_grad():
        in_sequence = {}
        for name, merged in merged_by.items():
            with lora.folded(model, merged):
                in_sequence[name] = model(x).logits
        assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
        for name, merged in merged_by.items():
            fresh = tiny_qwen2().to(torch.bfloat16)
            with lora.folded(fresh, merged):
                assert torch.equal(fresh(x).logits, in_sequence[name]), name
    # subtracting the update again, as the first version did, does not restore a bf16 W
    W = model.model.layers[0].self_attn.q_proj.weight
    delta = merged_by["concat"].modules["model.layers.0.self_attn.q_proj"].delta()
    assert not torch.equal(((W.float() + delta).to(torch.bfloat16).float() - delta).to(torch.bfloat16), W)


# ----------------------------------------------------------------------------------------- 2 processes vs 1
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def launch(script: str, *args, root: Path, processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """One process with python, or N CPU processes (gloo) with torchrun, as `accelerate launch` starts them."""
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    head = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    proc = subprocess.run([*head, str(REPO / script), *args, "--root", str(root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def adapter_tensors(root: Path, task: str) -> dict:
    return load_file(str(root / "adapters" / "tiny" / task / "adapter_model.safetensors"))


FLOAT32_EPS = 2.0 ** -24  # unit roundoff of float32
ADAM_STEP = 0.1 / 0.001 ** 0.5  # AdamW's largest step per entry, in units of lr: (1 - beta1) / sqrt(1 - beta2)


def data_parallel_tolerance(steps: int, lr: float, batch_size: int, max_len: int) -> float:
    """How far N processes may move a factor entry from where one process moves it. They compute the same gradient
    summed in another order: a sum of n float32 terms changes by at most n * eps times the sum of the terms'
    magnitudes (Higham, Accuracy and Stability, 2.2), with n at most the batch's tokens. AdamW's step is invariant
    to the scale of the gradient, so where the terms do not cancel (the gradient is of the size of that sum) a
    relative error delta changes a step by at most 2 delta times the largest step, lr * ADAM_STEP, and over `steps`
    steps these add up. This is not a worst case: an entry whose gradient's terms nearly cancel could take a first
    step of the other sign (up to 2 lr ADAM_STEP apart); none does in this test, where the largest difference
    measured here is 5.8e-7 (nli; 3.4e-7 for sentiment) against this tolerance of 2.9e-5."""
    return steps * lr * ADAM_STEP * 2 * batch_size * max_len * FLOAT32_EPS


def test_two_processes_train_route_and_evaluate_as_one(tiny_dir, tmp_path):
    # 26 rows in batches of 5: the 6th batch has one row, so the second process runs a zero-weight row there
    train = ["--task", "sentiment,nli", "--model", str(tiny_dir), "--max-steps", "8", "--batch-size", "5",
             "--epochs", "3", "--lr", "0.01", "--train-rows", "26", "--val-rows", "7", "--eval-every", "4"]
    tolerance = data_parallel_tolerance(steps=8, lr=0.01, batch_size=5, max_len=make_config("cpu").max_len)
    one, two = tmp_path / "one", tmp_path / "two"
    launch("train_individual_loras.py", *train, root=one)
    out = launch("train_individual_loras.py", *train, root=two, processes=2).stdout
    assert "8 steps on 2 process(es)" in out  # torchrun really gave two processes
    for task in ("sentiment", "nli"):
        a, b = adapter_tensors(one, task), adapter_tensors(two, task)
        assert a.keys() == b.keys() and any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= tolerance
        log1 = [json.loads(l) for l in (one / "adapters/tiny" / task / "train_log.jsonl").read_text().splitlines()]
        log2 = [json.loads(l) for l in (two / "adapters/tiny" / task / "train_log.jsonl").read_text().splitlines()]
        # the logged loss: the same sums in another order (n * eps relative), logged to 6 decimals
        assert [e["loss"] for e in log1] == pytest.approx([e["loss"] for e in log2], rel=5 * 192 * FLOAT32_EPS,
                                                          abs=1e-6)

    moa = ["--tasks", "sentiment,nli", "--model", str(tiny_dir), "--router-rows", "9", "--router-try-rows", "3",
           "--router-heldout", "4", "--router-batch-size", "4"]
    launch("train_moa.py", *moa, root=one)
    launch("train_moa.py", *moa, root=two, processes=2)
    r1 = load_file(str(one / "adapters/tiny/moa-2/routers.safetensors"))
    r2 = load_file(str(two / "adapters/tiny/moa-2/routers.safetensors"))
    assert max((r1[k] - r2[k]).abs().max().item() for k in r1) <= 1e-5

    evaluation = ["--tasks", "sentiment,nli", "--model", str(tiny_dir), "--methods", "base,single,moa,svd",
                  "--rows", "7", "--batch-size", "2", "--max-new-tokens", "6"]
    launch("full_evaluation.py", *evaluation, root=one)
    launch("full_evaluation.py", *evaluation, root=two, processes=2)
    for m in ("base", "single", "moa", "svd"):
        p1 = (one / "results/tiny/2-task" / f"{m}.predictions.jsonl").read_text()
        p2 = (two / "results/tiny/2-task" / f"{m}.predictions.jsonl").read_text()
        assert p1 == p2 and len(p1.splitlines()) == 14, m


def test_two_processes_resume_from_a_killed_run(tiny_dir, tmp_path):
    """Resuming is exact: a 2-process run killed after a checkpoint and resumed ends with the very adapter of a
    2-process run that was never stopped (same process count, same machine: the same arithmetic in the same order).
    Whether 2 processes equal 1 is the other test's question, with its tolerance."""
    args = ["--task", "sentiment", "--model", str(tiny_dir), "--max-steps", "150", "--epochs", "100",
            "--batch-size", "4", "--train-rows", "32", "--val-rows", "4", "--eval-every", "50", "--save-every", "5",
            "--patience", "50"]
    launch("train_individual_loras.py", *args, root=tmp_path / "straight", processes=2)
    root = tmp_path / "killed"
    ckpt = root / "adapters" / "tiny" / "sentiment" / "checkpoint.safetensors"
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "train_individual_loras.py"), *args, "--root", str(root)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 1200
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the run ended before its first checkpoint: nothing was interrupted"
    launch("train_individual_loras.py", *args, "--resume", root=root, processes=2)
    a, b = adapter_tensors(tmp_path / "straight", "sentiment"), adapter_tensors(root, "sentiment")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(l) for l in (root / "adapters/tiny/sentiment/train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 151))


# ------------------------------------------------------------------------------------------------ hub data
HUB_ROWS = {  # one row per task, with the field names and types of the hub datasets
    "summarization": {"article": "The cat sat on the mat all day. It was warm.", "highlights": "Cat sat on mat .",
                      "id": "a1"},
    "translation": {"translation": {"de": "Die Katze sitzt.", "en": "The cat sits."}},
    "qa": {"id": "q1", "title": "Cats", "context": "Cats sleep sixteen hours a day.", "question": "How long?",
           "answers": {"text": ["sixteen hours", "sixteen hours a day"], "answer_start": [11, 11]}},
    "sentiment": {"sentence": "a warm , funny film ", "label": 1, "idx": 0},
    "nli": {"premise": "The cat sleeps.", "hypothesis": "An animal rests.", "label": 0, "idx": 0},
    "paraphrasing": {"id": 1, "sentence1": "The cat sat on the mat .", "sentence2": "On the mat sat the cat .",
                     "label": 1},
    "commonsense": {"goal": "Keep a cat warm.", "sol1": "Give it a blanket.", "sol2": "Give it ice.", "label": 0},
}
HUB_SPLITS = {  # (hub id, config, revision) -> the split names the hub serves
    ("abisee/cnn_dailymail", "3.0.0", None): ("train", "validation", "test"),
    ("wmt/wmt14", "de-en", None): ("train", "validation", "test"),
    ("rajpurkar/squad", None, None): ("train", "validation"),
    ("nyu-mll/glue", "sst2", None): ("train", "validation", "test"),
    ("nyu-mll/glue", "mnli", None): ("train", "validation_matched", "validation_mismatched", "test_matched",
                                     "test_mismatched"),
    ("google-research-datasets/paws", "labeled_final", None): ("train", "validation", "test"),
    ("ybisk/piqa", "default", "refs/convert/parquet"): ("train", "validation", "test"),
}


@pytest.mark.parametrize("task_name", list(HUB_ROWS))
def test_hub_shaped_dataset_goes_through_the_local_path(task_name, monkeypatch):
    """A datasets.Dataset built in memory with the hub's fields and split names stands in for the hub."""
    import datasets

    from src.data import encode_train, fit_prompt, load_rows
    from src.metrics import score
    from src.models import embedded_model_dir, load_tokenizer
    from src.tasks import get_task

    task = get_task(task_name)
    calls = []

    def fake_load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        splits = HUB_SPLITS.get((path, name, revision))
        if splits is None or split not in splits:
            raise ValueError(f"no such dataset/config/split on the hub: {path} {name} {split} {revision}")
        bad = {**HUB_ROWS[task_name], "label": -1} if task_name == "nli" else None  # mnli has unlabeled rows
        return datasets.Dataset.from_list(([bad] if bad else []) + [HUB_ROWS[task_name]] * 5)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train = load_rows(task, "train", "hub", n=3)
    val = load_rows(task, "train", "hub", n=2, offset=len(train))
    test = load_rows(task, "eval", "hub", n=4)
    assert (len(train), len(val), len(test)) == (3, 2, 4)
    assert [c[2] for c in calls] == [task.train_split, task.train_split, task.eval_split]
    assert all(task.keep(r) for r in train + test)
    tokenizer = load_tokenizer(embedded_model_dir())
    example = encode_train(task, train[0], tokenizer, max_len=128, max_target=32)
    assert tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab != -100],
                            skip_special_tokens=True) == task.target(train[0])
    assert tokenizer.decode(fit_prompt(task, test[0], tokenizer, 128)) == task.prompt(test[0])
    refs = [task.references(r) for r in test]
    assert score(task, [task.target(r) for r in test], refs)[task.primary] == pytest.approx(
        100.0 if task.metric == "squad" else 1.0)


def test_unreachable_hub_is_one_line_that_keeps_its_cause(monkeypatch, capsys):
    import datasets

    from src.data import load_rows
    from src.tasks import get_task

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'ybisk/piqa' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BadInput, match=r"cannot load ybisk/piqa/default \[train\] .*ConnectionError.*--data local") as e:
        load_rows(get_task("commonsense"), "train", "hub")
    assert isinstance(e.value.__cause__, ConnectionError)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: load_rows(get_task("commonsense"), "train", "hub"))
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: cannot load ybisk/piqa")

    def broken(*args, **kwargs):  # not something the hub raises: a bug keeps its type and traceback
        raise KeyError("features")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(KeyError, match="features"):
        load_rows(get_task("commonsense"), "train", "hub")


def test_other_errors_keep_their_traceback():
    def out_of_memory():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        cli.run(out_of_memory)
    with pytest.raises(TypeError):
        cli.run(lambda: merges.merge(None, "svd"))


def test_gpu_check_runs_on_a_tiny_model(tmp_path):
    """`make gpu-check` cannot run here (no GPU); its script runs the same checks on a tiny model on the CPU."""
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--steps", "3", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["training"]["share_of_touched_entries_moved"] >= 0.999 and report["fold"]["restored_bit_identical"]
    assert report["moa"]["same_routes_as_alone"] and len(report["training"]["losses"]) == 3
