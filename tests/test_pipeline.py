"""The three scripts end to end on a tiny random model, kill-and-resume, and bad input."""
import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_tiny_model, tiny_qwen2
from src import peft_files  # noqa: E402
from src import cli

REPO = Path(__file__).resolve().parent.parent
SLOW_MACHINE_TIMEOUT = 1200  # a stage takes up to ~2 minutes here: room for a machine several times slower
TASKS = "sentiment,nli"
from src.tasks import SEVEN_TASKS  # noqa: E402
from src.layout import ALL_METHODS, METHODS  # noqa: E402  (METHODS: the defaults, base ... every default merge)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def script(name: str, *args, root: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / name), *args, "--root", str(root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=SLOW_MACHINE_TIMEOUT)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_scripts_end_to_end_write_every_output(tiny_dir, tmp_path):
    script("train_individual_loras.py", "--task", TASKS, "--model", str(tiny_dir), "--max-steps", "40", "--lr", "0.03",
           "--batch-size", "8", "--eval-every", "10", "--epochs", "10", "--train-rows", "64", "--val-rows", "8", root=tmp_path)
    script("train_moa.py", "--tasks", TASKS, "--model", str(tiny_dir), "--router-rows", "32", "--router-heldout", "16",
           "--router-try-rows", "8", "--router-lr", "0.01", "--router-epochs", "10", root=tmp_path)
    # the defaults: Arrow (routing without training) and RegMean among them
    assert {"arrow", "regmean"} <= set(METHODS)
    proc = script("full_evaluation.py", "--tasks", TASKS, "--model", str(tiny_dir), "--rows", "12", root=tmp_path)

    for task in TASKS.split(","):
        folder = tmp_path / "adapters" / "tiny" / task
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8
        assert len(load_file(str(folder / "adapter_model.safetensors"))) == 2 * 4 * 2
        log = [json.loads(l) for l in (folder / "train_log.jsonl").read_text().splitlines()]
        assert [e["step"] for e in log] == list(range(1, 41)) and "val_loss" in log[9] and log[0]["tokens_per_s"] > 0
        assert log[-1]["val_loss"] < 0.8 * log[9]["val_loss"]  # it learns
        assert not (folder / "checkpoint.safetensors").exists()
    moa = json.loads((tmp_path / "adapters" / "tiny" / "moa-2" / "routers.json").read_text())
    assert moa["tasks"] == ["sentiment", "nli"] and len(moa["layers"]) == 8
    # teacher-forced (what the routers are trained on): chance is 0.5 and layer 0's q/k/v (3 of 8 routers) see only
    # the last token, `:\n` for every task. Routing for real on this random model is not tested here: its std-0.3
    # weights make a wrong adapter move every later feature far from what the routers saw (tests/test_lora.py
    # checks real routing on a model made for it).
    last_epoch = [e["train_accuracy"] for e in moa["log"] if e.get("epoch") == 9 and "train_accuracy" in e]
    assert sum(last_epoch) / len(last_epoch) >= 0.7
    # the cpu preset's rows: routers on all 32 rows and on the first 8, those that route the held-out prompts for
    # real more accurately kept; the log kept is that run's (its chosen epoch and loss), and the held-out routing
    # accuracy (on other held-out prompts) has an interval around it
    choice = moa["router_rows_chosen"]
    assert [t["rows"] for t in choice["tried"]] == [32, 8] and all(0 <= t["routed"] <= 1 for t in choice["tried"])
    assert choice["rows"] == max(choice["tried"], key=lambda t: t["routed"])["rows"]
    assert moa["log"][-1] == {k: v for k, v in choice["tried"][[t["rows"] for t in choice["tried"]].index(
        choice["rows"])].items() if k != "rows"}
    epochs = [e for e in moa["log"] if "routed" in e and "epoch" in e]   # the kept run's epochs, scored
    assert len(epochs) == 10 and moa["log"][-1]["routed"] == max(e["routed"] for e in epochs)
    lo, hi = moa["heldout_accuracy"]["interval"]
    assert lo <= moa["heldout_accuracy"]["accuracy"] <= hi and set(moa["heldout_accuracy"]["per_task"]) == set(
        moa["tasks"])

    out = tmp_path / "results" / "tiny" / "2-task"
    results = {m: json.loads((out / f"{m}.json").read_text()) for m in METHODS}
    for m, result in results.items():
        assert set(result["metrics"]) == {"sentiment", "nli"} and result["rows"] == {"sentiment": 12, "nli": 12}
        if m != "majority":
            assert {"accuracy", "invalid"} <= set(result["metrics"]["nli"])
        assert {t: len(v) for t, v in result["stats"].items()} == {"sentiment": 12, "nli": 12}
        preds = [json.loads(l) for l in (out / f"{m}.predictions.jsonl").read_text().splitlines()]
        assert len(preds) == 24 and all(isinstance(p["prediction"], str) for p in preds)
    # the random base model says no label word; the sentiment LoRA always says one (the tiny model learns no 3-token
    # NLI label in 40 steps)
    assert results["base"]["metrics"]["sentiment"]["invalid"] == 1.0
    assert results["single"]["metrics"]["sentiment"]["invalid"] == 0.0
    # the majority row: the most frequent training label, scored against the test labels counted here
    for t, labels in (("sentiment", ("negative", "positive")), ("nli", ("entailment", "neutral", "contradiction"))):
        train = [json.loads(l)["label"] for l in (REPO / "data" / t / "train.jsonl").read_text().splitlines()]
        train = [y for y in train if y in (0, 1, 2)]
        top = max(sorted(set(train)), key=train.count)
        test = [json.loads(l)["label"] for l in (REPO / "data" / t / "test.jsonl").read_text().splitlines()][:12]
        assert results["majority"]["majority_class"][t] == labels[top]
        assert results["majority"]["metrics"][t]["accuracy"] == pytest.approx(test.count(top) / 12)
    # every merge names its three sets of rows, and they are disjoint: the train-split rows the adapters trained on
    # (64 here), the train-split rows it chose or learned on (after them), the evaluation split's rows it is scored on
    for m, result in results.items():
        if m in MERGES:
            assert_rows_disjoint(result["rows_used"], {"sentiment": [0, 64], "nli": [0, 64]}, m)
    assert results["ties"]["rows_used"]["selection"] == {"sentiment": [64, 72], "nli": [64, 72]}  # cpu: 8 rows
    router = results["moa"]["router"]
    assert len(router["per_layer"]) == 8 and sum(map(sum, router["confusion"]["counts"])) == 24 * 8
    # MoA names its routers: the file's hash and the settings they were trained with (train_moa's record)
    routers_file = tmp_path / "adapters" / "tiny" / "moa-2" / "routers.safetensors"
    trained = json.loads(routers_file.with_name("routers.json").read_text())["config"]
    assert router["trained"] == {"fingerprint": hashlib.sha256(routers_file.read_bytes()).hexdigest()[:16],
                                 **{k: v for k, v in trained.items() if k.startswith("router_") or k == "seed"},
                                 "router_rows_chosen": moa["router_rows_chosen"]["rows"]}
    assert router["interval"][0] <= router["accuracy"] <= router["interval"][1]
    assert router["trained"]["router_rows"] == trained["router_rows"] and "router_select" in router["trained"]
    # parameters held besides the base model, counted here from the files: every LoRA (single), plus the routers
    # (MoA), the merged LoRA's rank times its modules' d_in + d_out (svd: rank 8; concat: the two ranks together)
    files = {t: load_file(tmp_path / "adapters" / "tiny" / t / "adapter_model.safetensors") for t in ("sentiment", "nli")}
    loras = sum(v.numel() for f in files.values() for v in f.values())
    routers = sum(v.numel() for v in load_file(tmp_path / "adapters" / "tiny" / "moa-2" / "routers.safetensors").values())
    per_rank = sum(v.shape[1] if "lora_A" in k else v.shape[0] for k, v in files["nli"].items())
    ranks = sum(v.shape[0] for f in files.values() for k, v in f.items() if "lora_A" in k) // (len(files["nli"]) // 2)
    assert (results["base"]["parameters"], results["single"]["parameters"]) == (0, loras)
    assert results["moa"]["parameters"] == loras + routers and routers > 0
    assert results["svd"]["parameters"] == 8 * per_rank and results["concat"]["parameters"] == ranks * per_rank
    with open(out / "summary.csv") as f:
        table = list(csv.reader(f))
    assert table[0][:7] == ["method", "sentiment (accuracy)", "sentiment (accuracy) lo", "sentiment (accuracy) hi",
                            "nli (accuracy)", "nli (accuracy) lo", "nli (accuracy) hi"]
    assert [row[0] for row in table[1:]] == [m for m in ALL_METHODS if m in METHODS]
    single = table[1 + METHODS.index("single")]
    assert float(single[table[0].index("normalized")]) == 1.0
    assert float(single[table[0].index("sentiment (accuracy) lo")]) <= float(single[1]) <= float(single[3])
    summary = (out / "summary.md").read_text()
    assert "| svd |" in summary and "| iso_cts |" in summary and "| moa |" in proc.stdout
    ties = results["ties"]["merge"]
    tried = [c["params"]["lam"] for c in ties["selection"]["candidates"]]
    assert ties["params"]["density"] == 0.2 and tried[:4] == [0.5, 1.0, 1.5, 2.0]
    # the chosen lambda has a tried neighbour on each side, or the result says it is at the edge (search capped)
    assert (min(tried) < ties["params"]["lam"] < max(tried)) != bool(ties["selection"]["at_edge"])
    assert results["cat"]["merge"]["fit_seconds"] > 0 and results["lorahub"]["merge"]["evaluations"] == 41
    assert "chance level (1 / classes): sentiment 0.50, nli 0.33" in summary
    assert "| ties | density=0.2, lam=" in summary and f"lowest validation loss of {len(tried)} candidates" in summary

    arrow = json.loads((out / "arrow.json").read_text())
    candidates = arrow["arrow"]["selection"]["candidates"]
    assert arrow["arrow"]["params"] == min(candidates, key=lambda c: c["val_loss"])["params"]
    assert {(c["params"]["top_k"], c["params"]["temperature"]) for c in candidates} >= \
           {(k, t) for k in (1, 2) for t in (0.5, 1.0, 2.0, 4.0)}
    assert max(c["params"]["top_k"] for c in candidates) == 2  # two adapters: top_k 3 would mix the same two
    assert "top_k" not in arrow["arrow"]["selection"]["at_edge"]
    assert sum(map(sum, arrow["router"]["confusion"]["counts"])) == 24 * 8  # (prompt, layer) top choices
    assert_rows_disjoint(arrow["rows_used"], {"sentiment": [0, 64], "nli": [0, 64]}, "arrow")
    regmean = json.loads((out / "regmean.json").read_text())
    assert regmean["merge"]["gram_rows"] == {"sentiment": [0, 64], "nli": [0, 64]}  # rows=128: all 64 trained on
    assert_rows_disjoint(regmean["rows_used"], {"sentiment": [0, 64], "nli": [0, 64]}, "regmean")
    summary = (out / "summary.md").read_text()
    assert "| arrow |" in summary and "| regmean |" in summary

    # the control: the same merge of random LoRAs of the trained ones' norms, beside the trained one's row
    script("full_evaluation.py", "--tasks", TASKS, "--model", str(tiny_dir), "--rows", "12", "--methods", "regmean",
           "--loras", "random", root=tmp_path)
    control = json.loads((out / "random-loras" / "regmean.json").read_text())
    assert control["settings"]["loras"] == "random" and control["merge"]["gram_rows"] == regmean["merge"]["gram_rows"]
    trained_loss = {c["params"]["alpha"]: c["val_loss"] for c in regmean["merge"]["selection"]["candidates"]}
    same_alpha = [(c["val_loss"], trained_loss[c["params"]["alpha"]])
                  for c in control["merge"]["selection"]["candidates"] if c["params"]["alpha"] in trained_loss]
    assert len(same_alpha) >= 4 and all(a != b for a, b in same_alpha)  # other LoRAs were merged
    summary = (out / "summary.md").read_text()
    main_row = next(line for line in summary.splitlines() if line.startswith("| regmean |"))
    control_row = summary.split("**Control: the same merge of random LoRAs**")[1].split("\n| regmean | ")[1]
    trained_cell = control_row.split(" | ")[0]  # the trained merge's normalized score [95%], as in the main table
    assert re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", trained_cell) and f"| {trained_cell} |" in main_row


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_adapter(tiny_dir, tmp_path):
    args = ["--task", "sentiment", "--model", str(tiny_dir), "--max-steps", "400", "--epochs", "100",
            "--train-rows", "64", "--val-rows", "8", "--eval-every", "40", "--save-every", "10", "--patience", "50"]
    script("train_individual_loras.py", *args, root=tmp_path / "straight")

    root = tmp_path / "killed"
    ckpt = root / "adapters" / "tiny" / "sentiment" / "checkpoint.safetensors"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train_individual_loras.py"), *args, "--root", str(root)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the run ended before its first checkpoint: nothing was interrupted"
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        killed_at = json.loads(f.metadata()["state"])["step"]
    assert 0 < killed_at < 400
    script("train_individual_loras.py", *args, "--resume", root=root)

    a = load_file(str(tmp_path / "straight" / "adapters" / "tiny" / "sentiment" / "adapter_model.safetensors"))
    b = load_file(str(root / "adapters" / "tiny" / "sentiment" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it did train
    log = [json.loads(l) for l in (root / "adapters" / "tiny" / "sentiment" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 401))



def test_train_moa_on_attention_and_mlp_targets(tiny_dir, tmp_path):
    """train_moa.py over adapters on the original code's targets (q, k, v, gate, up, down): down_proj's router reads
    the MLP's hidden state (intermediate_size wide), the others hidden_size. Random adapters saved as the training
    script would, so this takes seconds; whether routers learn is tested on the attention targets above."""
    import train_moa
    from src import lora
    from src.evaluation import adapter_dir, moa_dir
    from src.models import load_model

    model, _ = load_model(str(tiny_dir), device="cpu")
    lora.inject(model, targets=lora.ORIGINAL_CODE_TARGETS)
    layers = lora.lora_layers(model)
    gen, tasks = torch.Generator().manual_seed(0), TASKS.split(",")
    for task in tasks:
        modules = {name: lora.Lora(torch.randn(4, m.base.in_features, generator=gen) * 0.05,
                                torch.randn(m.base.out_features, 4, generator=gen) * 0.05, 2.0)
                   for name, m in layers.items()}
        peft_files.save_adapter(lora.Adapter(modules, "tiny"), adapter_dir(tmp_path, str(tiny_dir), task))
    train_moa.main(["--tasks", TASKS, "--model", str(tiny_dir), "--router-rows", "4", "--router-heldout", "2",
                    "--router-epochs", "1", "--router-select", "last", "--router-try-rows", "0", "--root", str(tmp_path)])

    out = moa_dir(tmp_path, str(tiny_dir), tasks)
    meta = json.loads((out / "routers.json").read_text())
    assert meta["layers"] == list(layers) and len(meta["heldout_accuracy"]["per_layer"]) == 12
    assert meta["heldout_accuracy"]["n_prompts"] == 4 and len(meta["log"]) == 1  # 8 prompts, one batch of 8
    for task in tasks:
        lora.add_adapter(model, peft_files.load_adapter(adapter_dir(tmp_path, str(tiny_dir), task)), name=task)
    lora.load_routers(model, out, tasks)
    assert [m.router.in_features for m in layers.values()] == ([32] * 5 + [64]) * 2
    x = torch.randint(3, 1000, (3, 9), generator=gen)
    with torch.no_grad(), lora.routing(model):
        model(x)
        decisions = lora.route_decisions(model)
    assert decisions.shape == (3, 12) and decisions.max() <= 1
    # the epochs chosen on the held-out prompts routed for real: one line per epoch with its accuracy, then the chosen
    train_moa.main(["--tasks", TASKS, "--model", str(tiny_dir), "--router-rows", "4", "--router-heldout", "2",
                    "--router-epochs", "2", "--router-select", "heldout", "--router-try-rows", "0", "--root", str(tmp_path)])
    meta = json.loads((out / "routers.json").read_text())
    epochs = [e for e in meta["log"] if "routed" in e and "epoch" in e]
    assert meta["config"]["router_select"] == "heldout" and len(epochs) == 2
    assert meta["log"][-1]["chosen_epoch"] == max(epochs, key=lambda e: e["routed"])["epoch"]

# -------------------------------------------------------------------------------------------------- bad input
MERGES = {m for m in METHODS if m not in ("base", "majority", "single", "moa", "arrow")}


def assert_rows_disjoint(rows_used: dict, trained: dict, method: str):
    """A result's training, selection and test rows: training and selection from the train split, disjoint;
    test rows from the evaluation split (another file or hub split), so disjoint from both."""
    assert rows_used["train"] == trained and rows_used["test_split"] == "eval", method
    for t, (start, end) in rows_used["selection"].items():
        t0, t1 = rows_used["train"][t]
        assert end > start and (end <= t0 or start >= t1), (method, t)


def run_main(module_name: str, argv: list[str], capsys) -> str:
    """Run a script's main in-process through cli.run; return its one-line error (it must exit 2)."""
    module = __import__(module_name)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: module.main(argv))
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]  # progress bars may come before it
    assert err.startswith("error: ") and "Traceback" not in stderr
    return err


def test_unknown_task_and_method(tmp_path, capsys):
    err = run_main("train_individual_loras", ["--task", "summarisation", "--root", str(tmp_path)], capsys)
    assert "unknown task 'summarisation': choose from summarization, translation, qa" in err
    err = run_main("full_evaluation", ["--tasks", "qa", "--methods", "base,slerp", "--root", str(tmp_path)], capsys)
    assert "unknown method 'slerp': choose from paper, base, majority, single, moa" in err
    for value, message in (("abc", "ties.density='abc' is not a number: give a value in (0, 1]"),
                           ("0", "ties.density='0' is out of range: density must be in (0, 1]")):
        err = run_main("full_evaluation", ["--tasks", "qa", "--set", f"ties.density={value}", "--root", str(tmp_path)],
                       capsys)
        assert message in err
    assert not (tmp_path / "results").exists()


def test_missing_adapter_names_the_command(tiny_dir, tmp_path, capsys):
    err = run_main("full_evaluation", ["--tasks", TASKS, "--model", str(tiny_dir), "--root", str(tmp_path)], capsys)
    assert "missing adapter" in err and "sentiment/adapter_config.json" in err
    assert f"python train_individual_loras.py --task sentiment --model {tiny_dir} --preset cpu" in err
    err = run_main("train_moa", ["--tasks", TASKS, "--model", str(tiny_dir), "--root", str(tmp_path)], capsys)
    assert "create it with `python train_individual_loras.py --task sentiment" in err
    assert not (tmp_path / "results").exists()


def test_corrupt_adapter_and_no_partial_results(tiny_dir, tmp_path, capsys):
    import train_individual_loras

    train_individual_loras.main(["--task", TASKS, "--model", str(tiny_dir), "--max-steps", "2", "--train-rows", "16",
                                 "--val-rows", "4", "--root", str(tmp_path)])
    record = tmp_path / "adapters" / "tiny" / "nli" / "training.json"
    saved = record.read_text()
    record.unlink()  # an adapter that cannot say which rows it trained on: no merge may choose on rows for it
    err = run_main("full_evaluation", ["--tasks", TASKS, "--model", str(tiny_dir), "--methods", "base,ties",
                                       "--rows", "2", "--root", str(tmp_path)], capsys)
    assert "nli has no training.json (which rows it trained on): retrain it with `python train_individual" in err
    assert not (tmp_path / "results" / "tiny" / "2-task").exists()
    record.write_text(saved)
    weights = tmp_path / "adapters" / "tiny" / "nli" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated copy
    err = run_main("full_evaluation", ["--tasks", TASKS, "--model", str(tiny_dir), "--methods", "single,svd",
                                       "--rows", "2", "--root", str(tmp_path)], capsys)
    assert "corrupt adapter in" in err and "nli" in err
    assert not (tmp_path / "results" / "tiny" / "2-task").exists()  # only the training logs are there


def test_empty_data_file(tiny_dir, tmp_path, capsys, monkeypatch):
    import src.tasks

    for task in ("sentiment", "nli"):
        (tmp_path / "data" / task).mkdir(parents=True)
        (tmp_path / "data" / task / "test.jsonl").write_text("")
        (tmp_path / "data" / task / "train.jsonl").write_text("")
    monkeypatch.setattr(src.tasks, "DATA_DIR", tmp_path / "data")
    err = run_main("train_individual_loras", ["--task", "nli", "--model", str(tiny_dir), "--root", str(tmp_path)], capsys)
    assert "nli/train.jsonl is empty" in err
    err = run_main("full_evaluation", ["--tasks", TASKS, "--model", str(tiny_dir), "--methods", "base",
                                       "--root", str(tmp_path)], capsys)
    assert "sentiment/test.jsonl is empty" in err
    assert not (tmp_path / "adapters").exists() and not (tmp_path / "results").exists()


def test_merge_adapters_script_writes_a_peft_adapter(tiny_dir, tmp_path, capsys):
    import merge_adapters
    import train_individual_loras
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from src import merges

    train_individual_loras.main(["--task", TASKS, "--model", str(tiny_dir), "--max-steps", "3", "--train-rows", "24",
                                 "--val-rows", "4", "--lr", "0.05", "--root", str(tmp_path)])
    folders = [str(tmp_path / "adapters" / "tiny" / t) for t in TASKS.split(",")]
    merge_adapters.main(["--method", "svd", "--rank", "4", "--out", str(tmp_path / "merged"), *folders])
    merged = peft_files.load_adapter(tmp_path / "merged")
    want = merges.merge([peft_files.load_adapter(f) for f in folders], "svd", rank=4)
    assert all(torch.allclose(merged.modules[n].delta(), want.modules[n].delta()) for n in want.modules)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "merged")
    assert model.peft_config["default"].r == 4
    err = run_main("merge_adapters", ["--method", "weight_sum", "--weights", "1", "--out", str(tmp_path / "x"), *folders],
                   capsys)
    assert "--weights has 1 values for 2 adapters" in err and not (tmp_path / "x").exists()
    # what a new user tried: each exited 0 and wrote an adapter of NaN or zero factors, or one of the wrong rank
    bad = {("--method", "dare_linear", "--p", "1"): "dare_linear.p=1.0 is out of range: p must be in [0, 1)",
           ("--method", "task_arithmetic", "--lam", "nan"): "task_arithmetic.lam=nan is out of range",
           ("--method", "ties", "--density", "0"): "ties.density=0.0 is out of range: density must be in (0, 1]",
           ("--method", "concat", "--rank", "0"): "rank=0: give a whole number >= 1",
           ("--method", "ties", "--seed", "3"): "ties draws no random numbers: it takes no seed",
           ("--method", "svd", "--lam", "0.5"): "--lam is not a parameter of svd"}
    for flags, message in bad.items():
        err = run_main("merge_adapters", [*flags, "--out", str(tmp_path / "x"), *folders], capsys)
        assert message in err and not (tmp_path / "x").exists(), (flags, err)
    # an adapter with a NaN factor: refused, nothing written
    broken = tmp_path / "broken"
    shutil.copytree(folders[0], broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    err = run_main("merge_adapters", ["--method", "svd", "--out", str(tmp_path / "x"), str(broken), folders[1]], capsys)
    assert "adapter 1 of 2 has non-finite factors" in err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_shell_wrappers_run_every_stage(tiny_dir, tmp_path):
    """The three wrappers on the tiny model: 7 LoRAs, routers for the 5- and 7-task sets, every method on both; then
    scripts/seeds.sh for a second training seed."""
    env = {**os.environ, "MODEL": str(tiny_dir), "PRESET": "cpu", "PYTHON": sys.executable, "TQDM_DISABLE": "1"}
    small = {"train_all_tasks.sh": ["--max-steps", "1", "--train-rows", "8", "--val-rows", "2", "--max-len", "96",
                                    "--max-target", "16"],
             "train_moa.sh": ["--router-rows", "4", "--router-try-rows", "2", "--router-heldout", "2", "--router-epochs", "1",
                              "--max-prompt", "64"],
             "run_all_evaluation.sh": ["--rows", "2", "--max-new-tokens", "2", "--max-prompt", "64"]}
    for wrapper, args in small.items():
        proc = subprocess.run(["bash", str(REPO / wrapper), *args, "--root", str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=SLOW_MACHINE_TIMEOUT)
        assert proc.returncode == 0, f"{wrapper}: {proc.stderr[-3000:]}"
    assert len(list((tmp_path / "adapters" / "tiny").glob("*/adapter_model.safetensors"))) == 7
    assert {p.name for p in (tmp_path / "adapters" / "tiny").glob("moa-*")} == {"moa-5", "moa-7"}
    for n in (5, 7):
        out = tmp_path / "results" / "tiny" / f"{n}-task"
        assert all((out / f"{m}.json").exists() for m in METHODS) and (out / "summary.md").exists()
    assert json.loads((tmp_path / "results" / "tiny" / "5-task" / "single.json").read_text())["reused"] == \
        ["summarization", "translation", "qa", "sentiment", "nli"]
    # again with METHODS=paper: only the thesis's methods run; the 7-task run recomputes base and single instead of
    # reading the results already there (a reproduction), the 5-task run reuses those
    from src.layout import PAPER_METHODS

    results = tmp_path / "results" / "tiny"
    before = {p: p.stat().st_mtime_ns for p in results.glob("*-task/*.json")}
    proc = subprocess.run(["bash", str(REPO / "run_all_evaluation.sh"), *small["run_all_evaluation.sh"], "--root",
                           str(tmp_path)], env={**env, "METHODS": "paper"}, capture_output=True, text=True, timeout=SLOW_MACHINE_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rerun = {f"{p.parent.name}/{p.stem}" for p, t in before.items() if p.stat().st_mtime_ns != t}
    assert rerun == {f"{n}-task/{m}" for n in (5, 7) for m in PAPER_METHODS}
    assert json.loads((results / "7-task" / "single.json").read_text())["reused"] == []
    assert len(json.loads((results / "5-task" / "single.json").read_text())["reused"]) == 5
    # make reproduce's script: the same stages into a folder of their own, then the check against the run above (the
    # committed one here); nothing under the committed results/ is written. Then the maintainers' copy of the run.
    stage_flags = {f"{stage}_FLAGS": " ".join(small[wrapper]) for stage, wrapper in
                   [("TRAIN", "train_all_tasks.sh"), ("MOA", "train_moa.sh"), ("EVAL", "run_all_evaluation.sh")]}
    for part in ("7-task", "5-task", "train_logs"):   # as retrained seed 0, which the check reads first where it exists
        shutil.copytree(results / part, results / "retrained-seed0" / part)
    committed_files = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "reproduce.sh")], capture_output=True, text=True,
                          env={**env, **stage_flags, "METHODS": "paper", "REPRODUCE_ROOT": str(tmp_path / "repro"),
                               "COMMITTED_ROOT": str(tmp_path)}, timeout=SLOW_MACHINE_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "**Verdict: reproduced exactly" in proc.stdout   # same machine, seeds and settings: the same predictions
    assert "not compared" not in proc.stdout   # the routers' settings are recorded on both sides: MoA compared
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()} == committed_files
    repro = tmp_path / "repro" / "results" / "tiny"
    report = (repro / "reproduction.md").read_text()
    assert [report.count(f"| {n}-task | ") for n in (7, 5)] == [len(PAPER_METHODS)] * 2
    assert report.count(f" | {results / 'retrained-seed0'} |") == 2 * len(PAPER_METHODS)
    assert (repro / "reproduce_times-paper.md").read_text().count("| train_all_tasks.sh |") == 1
    proc = subprocess.run(["bash", str(REPO / "scripts" / "update_results.sh")], capture_output=True, text=True,
                          env={**env, "REPRODUCE_ROOT": str(tmp_path / "repro"), "RESULTS_ROOT": str(tmp_path / "kept")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for n in (5, 7):
        kept = tmp_path / "kept" / "results" / "tiny" / f"{n}-task"
        assert {p.name for p in kept.glob("*.json")} == {f"{m}.json" for m in PAPER_METHODS}
        assert (kept / "summary.md").read_text() == (repro / f"{n}-task" / "summary.md").read_text()
    proc = subprocess.run(["bash", str(REPO / "train_moa.sh"), "--root", str(tmp_path / "empty")], env=env,
                          capture_output=True, text=True, timeout=SLOW_MACHINE_TIMEOUT)
    assert proc.returncode == 2 and "missing adapter file" in proc.stderr  # set -e: the first failure stops it
    # another training seed (scripts/seeds.sh) beside the run above, which is seed 0: trained under runs/seed1,
    # evaluated, its files copied to results/<model>/seeds/seed1, and both seeds in the seed table
    from src import reporting

    seeds_env = {**env, "RUNS": str(tmp_path / "runs"), "RESULTS_ROOT": str(tmp_path), "SEED_METHODS": "single,moa,svd",
                 **stage_flags}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "seeds.sh"), "1"], env=seeds_env, capture_output=True,
                          text=True, timeout=SLOW_MACHINE_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = tmp_path / "runs" / "seed1" / "adapters" / "tiny"
    assert [json.loads((trained / t / "training.json").read_text())["seed"] for t in SEVEN_TASKS] == [1] * 7
    committed = results / "seeds" / "seed1"
    assert {p.name for p in (committed / "7-task").iterdir()} == {
        f"{m}{ext}" for m in ("single", "moa", "svd") for ext in (".json", ".predictions.jsonl")} | {
        "summary.md", "summary.csv"}
    assert len(list((committed / "train_logs").glob("*.jsonl"))) == 7
    for n in (5, 7):  # the routers' held-out accuracy, settings and curve, as train_moa.py saved them beside the routers
        router_log = json.loads((committed / "train_logs" / f"moa-{n}.json").read_text())
        assert router_log == json.loads((tmp_path / "runs" / "seed1" / "adapters" / "tiny" / f"moa-{n}" /
                                         "routers.json").read_text())
        assert len(router_log["tasks"]) == n and router_log["config"]["seed"] == 1
        assert 0 <= router_log["heldout_accuracy"]["accuracy"] <= 1
    assert list(reporting.seed_runs(results)) == [0, 1]  # (the random tiny model's single scores 0: no ratios)
    assert reporting.seeds_table(results).startswith("Seeds 0, 1 have results on 7 tasks, but no method")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "seeds.sh")], env=seeds_env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: bash scripts/seeds.sh SEED")


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [[], ["0"], ["1", "01"], ["2", "x"]])
def test_seeds_script_refuses_what_is_not_a_new_seed_before_any_work(seeds, tmp_path):
    """Seed 0 is the committed run, and a seed is a whole number from 1: anything else ends in one line, exit 2,
    before any stage starts (nothing under RUNS)."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "seeds.sh"), *seeds], capture_output=True, text=True,
                          env={**os.environ, "RUNS": str(tmp_path / "runs"), "PYTHON": sys.executable})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "usage: bash scripts/seeds.sh" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_each_task_starts_from_its_own_draw_and_a_rerun_is_bit_identical(tiny_dir, tmp_path):
    """The original trained each task in its own unseeded process (independent draws of A); here each task's seed
    comes from the run's seed and the task's name, so tasks differ and reruns do not."""
    import torch.nn.functional as F

    from src import lora
    from src.models import load_model
    from src.train import make_config, task_seed, train_lora

    assert task_seed(0, "qa") == task_seed(0, "qa") != task_seed(0, "nli") != task_seed(1, "nli")
    model, tokenizer = load_model(str(tiny_dir))
    fresh = {}
    for t in ("sentiment", "nli"):
        lora.inject(model)
        lora.add_adapter(model, r=8, alpha=16, generator=torch.Generator().manual_seed(task_seed(0, t)), name=t)
        fresh[t] = lora.get_adapter(model, t).modules["model.layers.0.self_attn.q_proj"].A
        lora.remove(model)
    cosine = F.cosine_similarity(fresh["sentiment"].flatten(), fresh["nli"].flatten(), dim=0)
    assert abs(cosine) < 0.2  # independent draws (the same seed would give 1.0)
    runs = []
    for k in range(2):
        cfg = make_config("cpu", dict(task="nli", max_steps=4, eval_every=2, train_rows=16, val_rows=4))
        train_lora(cfg, model, tokenizer, tmp_path / f"run{k}")
        runs.append(load_file(str(tmp_path / f"run{k}" / "adapter_model.safetensors")))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    first_A = runs[0]["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert not torch.equal(first_A, fresh["nli"])  # it trained, from that draw
    assert F.cosine_similarity(first_A.flatten(), fresh["nli"].flatten(), dim=0) > 0.9


def test_the_cpu_preset_is_the_setting_the_sweep_chose():
    """The cpu preset is not typed by hand: it is the committed sweep's choice on validation rows, the best setting
    within the training budget."""
    from src.train import make_config

    sweep = json.loads((REPO / "results" / "smollm2-135m" / "preset_sweep.json").read_text())
    chosen = {**sweep["common"], **sweep["settings"][sweep["chosen"]]}
    within = [s for s, o in sweep["settings"].items() if o["max_steps"] * o["batch_size"] <= sweep["train_budget_sequences"]]
    assert sorted(within) == sorted(sweep["within_budget"]) and len(within) < len(sweep["relative"])
    assert sweep["chosen"] == max(within, key=sweep["relative"].get)
    preset = vars(make_config("cpu"))
    assert {k: preset[k] for k in chosen} == chosen
    assert sweep["val_offset"] >= chosen["train_rows"] + chosen["val_rows"]  # never trained on, not the ES rows


def test_padding_skipped_gives_the_loss_and_gradients_of_each_row_alone(tiny_model):
    """Training's frozen linear layers multiply only the real tokens of a right-padded batch: the summed loss and
    the LoRA gradients equal those of each sequence run alone, without padding (float64, so rounding cannot hide
    a difference); the frozen layers saw only the real rows, and no hook outlives the context."""
    from torch import nn

    from src import lora
    from src.data import pad_batch
    from src.train import TargetLoss

    model = tiny_model.double()
    lora.inject(model)
    lora.add_adapter(model, r=8, alpha=16, trainable=True, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in lora.adapter_parameters(model):
            p.normal_(0, 0.1)  # B = 0 at init would leave half the gradients zero
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (20, 13, 7)]
    labels = [[-100] * (len(s) // 2) + s[len(s) // 2:] for s in seqs]
    params = lora.adapter_parameters(model)

    def loss_and_grads(batch):
        loss, n = TargetLoss(model)(**batch)
        return loss.detach(), int(n), torch.autograd.grad(loss, params)

    batch = pad_batch(seqs, 2, left=False, labels=labels)
    assert int(batch["attention_mask"].sum()) == 40 < batch["attention_mask"].numel()
    frozen = [m for m in model.base_model.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad]
    rows = []
    spy = frozen[0].register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    padded = loss_and_grads(batch)
    spy.remove()
    assert rows == [40]  # the real tokens, not 3 x 20
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in frozen)
    alone = [loss_and_grads(pad_batch([s], 2, left=False, labels=[y])) for s, y in zip(seqs, labels)]
    assert padded[1] == sum(a[1] for a in alone)
    assert torch.allclose(padded[0], sum(a[0] for a in alone), rtol=1e-12)
    for k, grad in enumerate(padded[2]):
        reference = sum(a[2][k] for a in alone)
        assert grad.abs().max() > 0 and torch.allclose(grad, reference, rtol=1e-10, atol=1e-14)

    # on a bf16 base with float32 factors (the GPU path): the same loss as computing the padded rows, to bf16 rounding
    bf16 = tiny_qwen2().to(torch.bfloat16)
    lora.inject(bf16)
    lora.add_adapter(bf16, r=8, alpha=16, trainable=True, generator=torch.Generator().manual_seed(1))
    losses = {skip: TargetLoss(bf16, skip_padding=skip)(**batch)[0].item() for skip in (True, False)}
    assert abs(losses[True] - losses[False]) <= 1e-2 * abs(losses[False])


def test_the_sweep_compares_each_setting_to_the_chosen_one_on_the_same_rows():
    """The chosen setting is the best within the training budget, even where one over it scores higher; vs_chosen:
    mean over tasks of a setting's metric over the chosen one's, with the paired bootstrap interval, only for
    settings whose per-row statistics are stored."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_preset", REPO / "scripts" / "sweep_preset.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    rng = torch.Generator().manual_seed(0)
    rows = {s: {t: (torch.rand(64, generator=rng) < p).float()[:, None].tolist() for t in ("sentiment", "nli")}
            for s, p in (("W", 0.95), ("X", 0.8), ("Y", 0.6), ("Z", 0.5))}
    results = {s: {"overrides": {"max_steps": 1000 if s == "W" else 90, "batch_size": 4},
                   "tasks": {t: {"val_metric": sum(r[0] for r in rows[s][t]) / 64, "stats": rows[s][t]}
                             for t in rows[s]}} for s in rows}
    del results["Z"]["tasks"]["nli"]["stats"]
    choice = sweep.choose(results, ["sentiment", "nli"], budget=384)
    assert max(choice["relative"], key=choice["relative"].get) == "W"  # the best, but 4,000 sequences
    assert choice["within_budget"] == ["X", "Y", "Z"]
    assert choice["chosen"] == "X" and set(choice["vs_chosen"]) == {"W", "Y"}
    point, (lo, hi) = choice["vs_chosen"]["Y"]
    expected = sum(results["Y"]["tasks"][t]["val_metric"] / results["X"]["tasks"][t]["val_metric"]
                   for t in ("sentiment", "nli")) / 2
    assert point == pytest.approx(expected) and lo < point < hi and hi < 1.0  # 0.6 vs 0.8 on 128 rows: clearly below

    # where the chosen setting scores 0 on a task, that task has no ratio and leaves the mean, point and interval alike
    results = {s: results[s] for s in ("W", "X")}
    results["X"]["tasks"]["nli"] = {"val_metric": 0.0, "stats": [[0.0]] * 64}
    choice = sweep.choose(results, ["sentiment", "nli"], budget=384)
    point, (lo, hi) = choice["vs_chosen"]["W"]
    sentiment = {s: results[s]["tasks"]["sentiment"]["val_metric"] for s in results}
    assert choice["chosen"] == "X" and point == pytest.approx(sentiment["W"] / sentiment["X"]) and lo < point < hi


def test_an_empty_cache_variable_means_the_default_cache(monkeypatch, tmp_path):
    """LORA_MERGING_CACHE= (empty) must not unpack the model into the working directory."""
    from src.models import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LORA_MERGING_CACHE", "")
    assert cache_dir() == tmp_path / ".cache" / "lora-merging"
    monkeypatch.setenv("LORA_MERGING_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_the_summary_prints_qa_f1_with_one_decimal_in_every_row(tmp_path):
    """QA's F1 is on 0-100: a collapsed method's 0.5 prints as 0.5, like the others' 56.1, not as 0.500."""
    import re
    import shutil

    from src.reporting import write_summary

    out = tmp_path / "7-task"
    shutil.copytree(REPO / "results" / "smollm2-135m" / "7-task", out)
    write_summary(out)
    table = [line.split(" | ") for line in (out / "summary.md").read_text().split("\n\n")[0].splitlines()]
    column = next(k for k, h in enumerate(table[0]) if h.startswith("qa ("))
    cells = [row[column] for row in table[2:] if row[column] != "n/a"]
    assert len(cells) >= 7 and all(re.fullmatch(r"\d+\.\d \[\d+\.\d, \d+\.\d\]", c) for c in cells), cells
    other = next(k for k, h in enumerate(table[0]) if h.startswith("summarization ("))
    summarization = [row[other] for row in table[2:] if row[other] != "n/a"]
    assert all(re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", c) for c in summarization), summarization


def test_the_summary_leaves_out_results_of_other_adapters(tmp_path):
    """A method computed on other adapters than single's (a rerun on adapters that rounded differently, say) would be
    divided by the wrong single scores: it leaves the table, and the summary says so."""
    import shutil

    from src.reporting import write_summary

    out = tmp_path / "7-task"
    shutil.copytree(REPO / "results" / "smollm2-135m" / "7-task", out)
    ties = json.loads((out / "ties.json").read_text())
    ties["settings"]["adapters"]["qa"] = "0123456789abcdef"
    (out / "ties.json").write_text(json.dumps(ties))
    write_summary(out)
    text = (out / "summary.md").read_text()
    assert "**Left out of this table** (computed on other adapters than single's (qa); rerun them): ties." in text
    assert not any(line.startswith("| ties |") for line in text.splitlines())
    assert any(line.startswith("| moa |") for line in text.splitlines())


def test_make_config_refuses_unknown_settings():
    from src.errors import BadInput
    from src.train import make_config

    with pytest.raises(BadInput, match="unknown training setting.s. learning_rate: TrainConfig has"):
        make_config("cpu", {"learning_rate": 1e-3})
    assert make_config("cpu", {"lr": 1e-3, "task": "qa"}).preset == "cpu"


@pytest.fixture
def no_model(monkeypatch):
    """Every script's model loader, made to fail: a flag test passes only if the script refused before loading."""
    import full_evaluation  # noqa: F401  (imported so that its src.evaluation is the one patched)
    import train_individual_loras
    import train_moa

    import src.evaluation

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    for module in (train_individual_loras, train_moa, src.evaluation):
        monkeypatch.setattr(module, "load_model", load_model)


@pytest.mark.parametrize("script_name, flags, message", [
    # what a new user tried: a traceback from the optimizer after the model loaded, a traceback from the parser,
    # every test row read silently, a router over one task reporting accuracy 1.000
    ("train_individual_loras", ["--task", "qa", "--lr", "-1"], "--lr -1.0 is out of range: give a finite number > 0"),
    ("full_evaluation", ["--tasks", "qa", "--set", "ties.density=abc"],
     "ties.density='abc' is not a number: give a value in (0, 1]"),
    ("full_evaluation", ["--tasks", "qa", "--rows", "0"], "--rows 0 is out of range: give a whole number >= 1"),
    ("full_evaluation", ["--tasks", "qa", "--set", "ties.lam=1", "--set", "ties.lam=2"],
     "ties.lam is set twice: give it once"),
    ("train_moa", ["--tasks", "qa"], "--tasks qa: a router chooses among tasks, give at least 2 (e.g. --tasks qa,"),
    ("train_moa", ["--tasks", "qa,nli", "--tasks", "sentiment,nli"],
     "several --tasks sets of 2 tasks would all be written to moa-2: give one set per size"),
    ("train_individual_loras", ["--task", "qa", "--max-steps", "-5"], "--max-steps -5 is out of range"),
    ("train_individual_loras", ["--task", "qa", "--targets", ","], "--targets () is not accepted"),
    ("train_moa", ["--tasks", "qa,nli", "--router-heldout", "0"], "--router-heldout 0 is out of range"),
    ("train_moa", ["--tasks", "qa,nli", "--router-try-rows", "400"],
     "--router-try-rows 400 is not fewer than --router-rows 400: give fewer rows to try, or 0"),
    ("train_moa", ["--tasks", "qa,nli", "--router-select", "last"],
     "--router-try-rows 48 is chosen against --router-rows on held-out prompts: add --router-select heldout, or give"),
    ("full_evaluation", ["--tasks", "qa", "--data", "local", "--seed", "-1"], "--seed -1 is out of range"),
    ("full_evaluation", ["--tasks", "qa", "--methods", "single,ties", "--loras", "random"],
     "--loras random is a control for the merges: drop single from --methods"),
])
def test_bad_flags_fail_in_one_line_before_the_model_loads(script_name, flags, message, tmp_path, capsys, no_model):
    err = run_main(script_name, [*flags, "--root", str(tmp_path)], capsys)
    assert message in err, err
    assert not any(tmp_path.iterdir())  # nothing written: no adapters/ or results/ folder


def _refused(setting) -> list:
    """Values of a wrong type or out of range for `setting` (src.settings.Setting)."""
    wrong_type = [object(), True] if setting.kind is not bool else [1, "yes"]
    if setting.kind is int:
        wrong_type += [2.5, "3"]
    if setting.kind is float:
        wrong_type += ["1e-3"]
    out_of_range = []
    if setting.kind in (int, float):
        assert setting.low is not None, "a numeric setting needs a range"
        out_of_range += [setting.low if "low" in setting.open else setting.low - 1]
        out_of_range += [] if setting.high is None else [setting.high if "high" in setting.open else setting.high + 1]
        out_of_range += [float("nan"), float("inf")] if setting.kind is float else []
    if setting.kind is str:
        out_of_range += ["", " "] + (["no-such-choice"] if setting.choices else [])
    if setting.kind is tuple:
        out_of_range += [(), ("q_proj", "q_proj"), ("",)]
    return wrong_type + out_of_range


def _config_cases():
    from dataclasses import fields

    from src.evaluation import EVAL_SETTINGS, EvalConfig, make_eval_config
    from src.train import TRAIN_SETTINGS, TrainConfig, make_config

    # every field of both dataclasses: one added later without a Setting fails here (KeyError)
    return [pytest.param(make, table[f.name], f.name, id=f"{cls.__name__}.{f.name}")
            for cls, table, make in ((TrainConfig, TRAIN_SETTINGS, make_config),
                                     (EvalConfig, EVAL_SETTINGS, make_eval_config)) for f in fields(cls)]


@pytest.mark.parametrize("make, setting, name", _config_cases())
def test_every_config_field_refuses_wrong_types_and_values_out_of_range(make, setting, name):
    """make_config / make_eval_config check every field against its declared Setting: a value of the wrong type
    (a bool or a string for a number, a float for a count) or out of range is a one-line BadInput naming the flag."""
    from src.errors import BadInput

    flag = "^(--preset |unknown preset )" if name == "preset" else f"^--{name.replace('_', '-')} "
    for value in _refused(setting):
        with pytest.raises(BadInput, match=flag) as info:
            make(value, {}) if name == "preset" else make("cpu", {name: value})  # the preset is an argument
        message = str(info.value)  # one line, and it says what to give instead
        assert "\n" not in message and ("give " in message or "choose from" in message), (name, value)


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_each_presets_own_values_pass_the_checks(preset):
    from dataclasses import fields

    from src.evaluation import EVAL_PRESETS, EVAL_SETTINGS, make_eval_config
    from src.settings import check_config
    from src.tasks import TASKS
    from src.train import PRESETS, TRAIN_SETTINGS, TrainConfig, make_config

    assert preset in PRESETS and preset in EVAL_PRESETS
    for task in TASKS:
        make_config(preset, {"task": task})
    make_eval_config(preset)
    assert set(TRAIN_SETTINGS) == {f.name for f in fields(TrainConfig)}
    assert set(EVAL_SETTINGS) == {f.name for f in fields(make_eval_config(preset))}
    with pytest.raises(TypeError, match="have no Setting"):  # a field without a declared Setting is a code bug
        check_config(make_config(preset), {k: v for k, v in TRAIN_SETTINGS.items() if k != "lr"})


@pytest.mark.parametrize("task_set", ["5-task", "7-task"] + sorted(
    str(p.relative_to(REPO / "results" / "smollm2-135m")) for p in (REPO / "results" / "smollm2-135m").glob("seeds/*/7-task")))
def test_committed_merges_name_disjoint_training_selection_and_test_rows(task_set):
    """Every merge in a committed table names the rows its adapters trained on, the rows it chose or learned on,
    and the rows it was scored on, and they are disjoint, on every training seed (results left out of the table,
    computed on other adapters, are not in it to check)."""
    from src.reporting import load_method_results, same_inputs
    from src.train import make_config

    folder = REPO / "results" / "smollm2-135m" / task_set
    kept, _ = same_inputs(load_method_results(folder))
    control = {f"{m} (random LoRAs)": r for m, r in load_method_results(folder / "random-loras").items()}
    trained = [0, make_config("cpu").train_rows]  # the committed run is the cpu preset's
    for m, result in {**kept, **control}.items():
        if "merge" in result or "arrow" in result:
            assert "rows_used" in result, f"{m}: computed before the rows were recorded: rerun it"
            assert_rows_disjoint(result["rows_used"], {t: trained for t in result["tasks"]}, m)


def test_results_written_before_a_setting_existed_are_reused_under_its_default(tmp_path):
    """A result file from before a setting was added (EvalConfig.loras) was made with what its default does now:
    single's rows are reused from it; a run with another value of the setting does not reuse them."""
    from dataclasses import asdict

    from src.evaluation import EvalConfig, _reusable

    settings = {**asdict(EvalConfig()), "adapters": {"qa": "a1"}, "inputs": {"qa": "i1"}}
    folder = tmp_path / "7-task"
    folder.mkdir()
    old = {k: v for k, v in settings.items() if k != "loras"}
    (folder / "single.json").write_text(json.dumps({"settings": old, "metrics": {"qa": {"f1": 50.0}},
                                                    "stats": {"qa": [[1.0]]}}))
    (folder / "single.predictions.jsonl").write_text(json.dumps({"task": "qa", "prediction": "x"}) + "\n")
    assert set(_reusable(tmp_path, "single", settings)) == {"qa"}
    assert _reusable(tmp_path, "single", {**settings, "loras": "random"}) == {}


@pytest.mark.parametrize("script_name, cls_path, presets_path", [
    ("train_individual_loras", "src.train.TrainConfig", "src.train.PRESETS"),
    ("train_moa", "src.train.TrainConfig", "src.train.PRESETS"),
    ("full_evaluation", "src.evaluation.EvalConfig", "src.evaluation.EVAL_PRESETS")])
def test_every_settings_flag_is_generated_from_its_declaration(script_name, cls_path, presets_path, capsys):
    """Each setting is declared once, with its field (default, what it accepts, help): a script's flag for it has
    that help and every preset's value, and a value out of range is refused by the same declaration."""
    import importlib
    from dataclasses import fields

    module, cls = importlib.import_module(script_name), None
    mod, _, name = cls_path.rpartition(".")
    cls = getattr(importlib.import_module(mod), name)
    pmod, _, pname = presets_path.rpartition(".")
    presets = getattr(importlib.import_module(pmod), pname)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    common = {"model", "data", "preset", "task"}   # cli.common_parser's (and the task, a script's own)
    flags = [f for f in fields(cls) if f"--{f.name.replace('_', '-')} " in text and f.name not in common]
    assert len(flags) >= 6, script_name
    for f in flags:
        first_words = " ".join(f.metadata["help"].split()[:3])
        assert first_words in text, (script_name, f.name)
        for preset, values in presets.items():
            value = values.get(f.name, f.default)
            shown = ",".join(value) if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) else str(value)
            assert f"{preset}: {shown}" in text, (script_name, f.name, preset)
