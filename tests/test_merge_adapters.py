"""merge_adapters.py on adapters made here in PEFT's format (unequal ranks, one rsLoRA) on a tiny model: parameters
chosen on a user's rows (or a task's rows after the adapter's training rows), CAT and LoraHub from the command, a
full model saved with the merge folded in, and bad row files refused in one line with nothing written."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import save_tiny_model
from src import peft_files
from src import cli, lora, merge_fit, merges, provenance, registry
from src.data import load_rows
from src.models import load_model
from src.tasks import get_task

REPO = Path(__file__).resolve().parent.parent
TARGETS = ("q_proj", "v_proj")
ROWS = 6


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(str(tiny_dir))


def make_adapter(folder: Path, model, rank: int, seed: int, rslora: bool = False, targets=TARGETS) -> Path:
    """A PEFT-format adapter of random factors on the `targets` of every layer, alpha 8; with rslora the config says
    use_rslora, and the scale is alpha / sqrt(r) (PEFT's rsLoRA) instead of alpha / r."""
    alpha = 8.0
    g = torch.Generator().manual_seed(seed)
    modules = {name: lora.Lora(torch.randn(rank, m.in_features, generator=g) * 0.3,
                               torch.randn(m.out_features, rank, generator=g) * 0.3, alpha / rank)
               for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets}
    peft_files.save_adapter(lora.Adapter(modules, "tiny"), folder)
    if rslora:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, model):
    """Three adapters: rank 4; rank 2 with rsLoRA; rank 4 again (LoraHub's factor sum needs equal ranks)."""
    root = tmp_path_factory.mktemp("adapters")
    folders = [make_adapter(root / "a", model[0], 4, 1), make_adapter(root / "b", model[0], 2, 2, rslora=True),
               make_adapter(root / "c", model[0], 4, 3)]
    b = peft_files.load_adapter(folders[1])
    assert all(f.scale == pytest.approx(8.0 / 2 ** 0.5) for f in b.modules.values())  # rsLoRA read as such
    return folders


def task_rows(task: str, n: int, offset: int = 0) -> list[dict]:
    """A task's train rows as a user's {"prompt", "target"} rows."""
    t = get_task(task)
    return [{"prompt": t.prompt(r), "target": t.target(r)} for r in load_rows(t, "train", "local", n=n, offset=offset)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def plain_loss(model, tokenizer, rows: list[dict]) -> float:
    """The mean cross-entropy over the target tokens and EOS of `rows`, one row at a time, written out here
    independently of src.train."""
    total, count = 0.0, 0
    for r in rows:
        prompt = tokenizer(r["prompt"]).input_ids
        target = tokenizer(r["target"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        logits = model(torch.tensor([prompt + target])).logits[0]
        predicted = logits[len(prompt) - 1:-1]  # the positions that predict each target token
        total += F.cross_entropy(predicted.float(), torch.tensor(target), reduction="sum").item()
        count += len(target)
    return total / count


def run_error(argv: list[str], capsys) -> str:
    """merge_adapters through cli.run: it must exit 2 with a one-line error (progress bars may come before it), no
    traceback; returns that line."""
    import merge_adapters

    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: merge_adapters.main(argv))
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]
    assert err.startswith("error: ") and "Traceback" not in stderr, stderr
    return err


def test_the_grid_is_chosen_on_the_users_rows(tiny_dir, model, adapters, tmp_path, capsys):
    import merge_adapters

    files = [write_rows(tmp_path / "sentiment.jsonl", task_rows("sentiment", ROWS)),
             write_rows(tmp_path / "nli.jsonl", task_rows("nli", ROWS))]
    out = tmp_path / "merged"
    merge_adapters.main(["--method", "task_arithmetic", "--model", str(tiny_dir), "--rows", ",".join(map(str, files)),
                         "--out", str(out), *map(str, adapters[:2])])
    record = json.loads((out / "merge.json").read_text())
    candidates = record["selection"]["candidates"]
    assert record["params"] == min(candidates, key=lambda c: c["val_loss"])["params"]
    assert [c["params"]["lam"] for c in candidates][:4] == list(registry.LAMBDA_SUM)
    for f in files:  # every row of each file, named by its hash
        assert record["selection"]["rows"][str(f)] == {"file": str(f), "rows": ROWS, "of": ROWS, "lines": [1, ROWS],
                                                       "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    # each candidate's loss is the mean over the files of the target-token loss, as computed here independently
    # (float32 forwards, batched there and one row at a time here: agreement to 1e-5 relative)
    loaded = [peft_files.load_adapter(a) for a in adapters[:2]]
    rows = [[json.loads(line) for line in f.read_text().splitlines()] for f in files]
    m, tokenizer = model
    for c in candidates:
        with lora.folded(m, merges.merge(loaded, "task_arithmetic", **c["params"])):
            want = sum(plain_loss(m, tokenizer, r) for r in rows) / len(rows)
        assert c["val_loss"] == pytest.approx(want, rel=1e-5), c
    # the choice merge_fit.build makes on the same examples, and the adapter written is that merge
    data = merge_fit.FitData(m, tokenizer, list(map(str, files)),
                             sources={str(f): merge_fit.FileRows.read(f) for f in files})
    _, info = merge_fit.build("task_arithmetic", loaded, data, ROWS)
    assert info["params"] == record["params"]
    assert [c["params"] for c in info["selection"]["candidates"]] == [c["params"] for c in candidates]
    written, want = peft_files.load_adapter(out), merges.merge(loaded, "task_arithmetic", **record["params"])
    assert all(torch.allclose(written.modules[n].delta(), want.modules[n].delta(), atol=1e-6) for n in want.modules)
    printed = capsys.readouterr().out
    assert f"lam={record['params']['lam']:g}: {min(c['val_loss'] for c in candidates):.6f}  <- chosen" in printed
    assert f"rows of {files[0]}: {ROWS} of {ROWS} (lines 1-{ROWS}" in printed
    # --select-rows takes the first N rows of each file; --weights enter every candidate and the merge written
    merge_adapters.main(["--method", "ties", "--density", "0.5", "--weights", "1,0.5", "--model", str(tiny_dir),
                         "--rows", ",".join(map(str, files)), "--select-rows", "2", "--out", str(tmp_path / "ties"),
                         *map(str, adapters[:2])])
    record = json.loads((tmp_path / "ties" / "merge.json").read_text())
    assert record["params"]["density"] == 0.5 and record["selection"]["rows"][str(files[1])]["lines"] == [1, 2]
    assert record["options"] == {"weights": [1.0, 0.5]}
    data = merge_fit.FitData(m, tokenizer, list(map(str, files)),
                             sources={str(f): merge_fit.FileRows.read(f) for f in files})
    _, info = merge_fit.build("ties", loaded, data, 2, {"density": 0.5}, options={"weights": [1.0, 0.5]})
    assert [c["val_loss"] for c in info["selection"]["candidates"]] == \
           [c["val_loss"] for c in record["selection"]["candidates"]]
    written, want = peft_files.load_adapter(tmp_path / "ties"), merges.merge(loaded, "ties", weights=[1, 0.5], **record["params"])
    assert all(torch.allclose(written.modules[n].delta(), want.modules[n].delta(), atol=1e-6) for n in want.modules)


def test_task_names_read_the_rows_after_the_training_rows_same_as_a_file_of_them(tiny_dir, model, adapters,
                                                                                   tmp_path):
    """--rows sentiment,nli: each task's train rows after those its adapter's training record names, the same rows
    (and so the same choice, candidate for candidate) as files holding them; an adapter without a record is
    refused (the rows it trained on are unknown)."""
    import merge_adapters

    folders = []
    for task, folder in zip(("sentiment", "nli"), adapters[:2]):
        own = tmp_path / task
        own.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (own / f).write_bytes((folder / f).read_bytes())
        provenance.write_record(own, {"task": task, "preset": "cpu", "source": provenance.data_source(get_task(task),
                                                                                                       "local"),
                                      "rows": {"train": [0, 40], "validation": [40, 48]}, "max_len": 512,
                                      "max_target": 128})
        folders.append(str(own))
    merge_adapters.main(["--method", "iso_c", "--model", str(tiny_dir), "--rows", "sentiment,nli", "--select-rows",
                         str(ROWS), "--out", str(tmp_path / "by_task"), *folders])
    by_task = json.loads((tmp_path / "by_task" / "merge.json").read_text())
    assert by_task["selection"]["rows"] == {"sentiment": [40, 40 + ROWS], "nli": [40, 40 + ROWS]}
    files = [write_rows(tmp_path / f"{t}.jsonl", task_rows(t, ROWS, offset=40)) for t in ("sentiment", "nli")]
    merge_adapters.main(["--method", "iso_c", "--model", str(tiny_dir), "--rows", ",".join(map(str, files)),
                         "--out", str(tmp_path / "by_file"), *folders])
    by_file = json.loads((tmp_path / "by_file" / "merge.json").read_text())
    assert by_task["params"] == by_file["params"]
    assert [(c["params"], c["val_loss"]) for c in by_task["selection"]["candidates"]] == \
           [(c["params"], c["val_loss"]) for c in by_file["selection"]["candidates"]]


def test_cat_and_lorahub_learn_on_the_users_rows(tiny_dir, adapters, tmp_path):
    import merge_adapters

    files = [write_rows(tmp_path / f"{t}.jsonl", task_rows(t, 4)) for t in ("sentiment", "nli")]
    rows = ",".join(map(str, files))
    merge_adapters.main(["--method", "cat", "--model", str(tiny_dir), "--rows", rows, "--epochs", "2", "--lr", "0.05",
                         "--out", str(tmp_path / "cat"), *map(str, adapters[:2])])  # ranks 4 and 2 (rsLoRA)
    record = json.loads((tmp_path / "cat" / "merge.json").read_text())
    assert record["params"]["rows"] == 4 and record["rows_per_task"] == {str(f): 4 for f in files}
    assert _mean(record["loss_after"]) < _mean(record["loss_before"])
    loaded, written = [peft_files.load_adapter(a) for a in adapters[:2]], peft_files.load_adapter(tmp_path / "cat")
    for name, alphas in record["alphas"].items():  # the concatenation with the learned weights
        want = lora.concat([a.modules[name] for a in loaded], weights=alphas)
        assert written.modules[name].A.shape[0] == 6 and torch.allclose(written.modules[name].delta(), want.delta(),
                                                                        atol=1e-6)
    merge_adapters.main(["--method", "lorahub", "--model", str(tiny_dir), "--rows", rows, "--budget", "6",
                         "--out", str(tmp_path / "hub"), str(adapters[0]), str(adapters[2])])  # equal ranks
    record = json.loads((tmp_path / "hub" / "merge.json").read_text())
    assert record["evaluations"] == 7 and record["objective_best"] <= record["objective_start"]
    assert record["params"]["rows"] == 4  # every row of the files (LoraHub's own default would be 5)
    want = merges.merge([loaded[0], peft_files.load_adapter(adapters[2])], "weight_sum", weights=record["weights"])
    written = peft_files.load_adapter(tmp_path / "hub")
    assert all(torch.allclose(written.modules[n].delta(), want.modules[n].delta(), atol=1e-6) for n in want.modules)


def test_cat_merges_adapters_of_different_modules_over_their_union(tiny_dir, model, adapters, tmp_path, capsys):
    """An adapter of q_proj only and one of q_proj and v_proj: CAT learns on their union; at v_proj the merge is the
    other adapter's update times its alpha (the q-only adapter has no branch there)."""
    import merge_adapters

    q_only = make_adapter(tmp_path / "q", model[0], 3, 4, targets=("q_proj",))
    files = [write_rows(tmp_path / f"{t}.jsonl", task_rows(t, 3)) for t in ("sentiment", "nli")]
    merge_adapters.main(["--method", "cat", "--model", str(tiny_dir), "--rows", ",".join(map(str, files)),
                         "--lr", "0.05", "--out", str(tmp_path / "cat"), str(q_only), str(adapters[0])])
    assert "note: the adapters adapt different modules (2 adapted by all, 4 by any)" in capsys.readouterr().out
    record, written = json.loads((tmp_path / "cat" / "merge.json").read_text()), peft_files.load_adapter(tmp_path / "cat")
    a = peft_files.load_adapter(adapters[0])
    assert set(written.modules) == set(a.modules)
    for name, alphas in record["alphas"].items():
        if name.endswith("v_proj"):
            assert written.modules[name].A.shape[0] == 4
            assert torch.allclose(written.modules[name].delta(), alphas[1] * a.modules[name].delta(), atol=1e-6)
        else:
            assert written.modules[name].A.shape[0] == 3 + 4 and alphas[0] != alphas[1]


def _mean(losses: dict) -> float:
    return sum(losses.values()) / len(losses)


def test_the_merged_model_loads_in_transformers_alone_with_the_merge_folded_in(tiny_dir, model, adapters, tmp_path):
    """--save-merged-model: a save_pretrained folder (safetensors, the tokenizer beside it) whose logits are the base
    model's with the merged adapter folded in (src.lora.folded). Both are float32 models holding bit-identical
    weights (the fold is the same code; safetensors stores float32 exactly) run by the same transformers code on
    the same CPU, so the logits are expected equal; the tolerance, 1e-6 relative to the largest logit, only leaves
    room for a kernel choosing another summation order."""
    import merge_adapters
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merge_adapters.main(["--method", "ties", "--model", str(tiny_dir), "--save-merged-model", str(tmp_path / "full"),
                         "--out", str(tmp_path / "merged"), *map(str, adapters)])
    saved = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert "model.safetensors" in saved and "tokenizer.json" in saved and not any(p.endswith(".bin") for p in saved)
    assert not (tmp_path / "full" / "adapter_config.json").exists()
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "full")
    ids = torch.tensor([tokenizer("The merged model, served as it is: ### Sentiment:\n").input_ids])
    m = model[0]
    merged = merges.merge([peft_files.load_adapter(a) for a in adapters], "ties")
    with torch.no_grad(), lora.folded(m, merged):
        want = m(ids).logits
        same = {n: torch.equal(p, served.state_dict()[n]) for n, p in m.state_dict().items()}
    got = served(ids).logits
    assert all(same.values())  # every weight bit for bit, the folded ones included
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    with torch.no_grad():
        assert not torch.allclose(m(ids).logits, want)  # the merge changed the model (and folded is undone)


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a", "target": "b"}\n{"prompt": "c"}\n', 'line 2: no "target" field'),
    ("", "no rows (the file is empty)"),
    ('{"prompt": "a", "target": "b"}\n\n{"prompt": "a", target: "b"}\n', "line 3: invalid JSON"),
    ('["a", "b"]\n', "line 1: a JSON list, not an object"),
    ('{"prompt": "a", "target": ""}\n', 'line 1: "target" is empty'),
    ('{"prompt": "a", "target": "b"}\n' * 2 + json.dumps({"prompt": "word " * 600, "target": "b"}) + "\n",
     "line 3: 603 tokens (prompt, target and EOS), longer than the model's window of 512"),
])
def test_a_bad_row_file_is_refused_in_one_line_naming_file_and_line(content, message, tiny_dir, adapters, tmp_path,
                                                                     capsys, monkeypatch):
    import src.models

    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    write_rows(good, task_rows("sentiment", 2))
    bad.write_text(content)
    if "window" not in message:  # found before the model loads
        monkeypatch.setattr(src.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    err = run_error(["--method", "task_arithmetic", "--model", str(tiny_dir), "--rows", f"{good},{bad}",
                     "--out", str(tmp_path / "out"), *map(str, adapters[:2])], capsys)
    assert f"{bad}" in err and message in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_refusals_before_any_work(tiny_dir, adapters, tmp_path, capsys, monkeypatch):
    import src.models

    monkeypatch.setattr(src.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    good = write_rows(tmp_path / "good.jsonl", task_rows("sentiment", 2))
    other = write_rows(tmp_path / "other.jsonl", task_rows("nli", 2))
    two = [str(a) for a in adapters[:2]]
    out = ["--out", str(tmp_path / "out")]
    cases = {
        ("--method", "ties", "--rows", str(good)): "--rows has 1 entries for 2 adapters",
        ("--method", "ties", "--rows", f"{good},{good}"): f"--rows names {good} for several adapters",
        ("--method", "ties", "--rows", f"{good},{tmp_path / 'none.jsonl'}"): "--rows: no file",
        ("--method", "cat"): "cat learns its merge from rows: give --rows",
        ("--method", "lorahub", "--rows", f"{good},{good}x", "--weights", "1,1"): "lorahub learns its own weights",
        ("--method", "concat", "--rows", f"{good},{other}"): "--rows: concat has no parameter left to choose",
        ("--method", "task_arithmetic", "--lam", "0.5", "--rows", f"{good},{other}"): "no parameter left to choose",
        ("--method", "ties", "--select-rows", "4"): "--select-rows counts the rows of --rows",
        ("--method", "ties", "--rows", "sentiment,nli"): "has no training.json",
        ("--method", "ties", "--save-merged-model", str(tmp_path / "out")): "another folder than --out",
    }
    for flags, message in cases.items():
        err = run_error([*flags, "--model", str(tiny_dir), *out, *two], capsys)
        assert message in err, (flags, err)
        assert not (tmp_path / "out").exists()


def peft_adapter(folder: Path, tiny_dir: Path, rank: int, targets: list[str], seed: int, rslora: bool = False) -> Path:
    """An adapter made by PEFT itself (get_peft_model, save_pretrained), its A and B filled with random values (PEFT
    starts B at zero, which would make every merge the base model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                LoraConfig(r=rank, lora_alpha=8, target_modules=targets, use_rslora=rslora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(folder)
    return folder


def dense_updates(folder: Path) -> dict[str, torch.Tensor]:
    """Each module's update s B A in float64, read straight from PEFT's files (keys ...<module>.lora_A.weight, scale
    lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora), independently of src.lora's reader."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    r = config["r"]
    scale = config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)
    tensors = load_file(folder / "adapter_model.safetensors")
    return {key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"):
            scale * tensors[key.replace("lora_A", "lora_B")].double() @ tensors[key].double()
            for key in tensors if key.endswith(".lora_A.weight")}


def test_peft_adapters_of_unequal_ranks_and_targets_merged_on_rows_load_in_peft_as_the_dense_merge(tiny_dir, tmp_path):
    """End to end, as a user would: three adapters saved by PEFT (ranks 4, 2 with rsLoRA, 3; targets q/v, q/k/o,
    v/up) merged by task arithmetic with lambda chosen on two row files; merge.json holds the candidates and the
    choice (the lowest loss); the written adapter, loaded by PEFT's own PeftModel, gives the logits of the dense
    float64 reference W_0 + lambda sum_i s_i B_i A_i over the union of the modules (an adapter that does not adapt a
    module adds nothing there). Tolerance: the PEFT model runs in float32 and the reference in float64; a logit of
    this 2-layer, 32-wide model sums a few hundred rounded products, so its float32 error stays below
    ~1e3 x 6e-8 of the logits' scale; 1e-4 of the largest logit leaves a margin of more than 1e3."""
    import merge_adapters
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = [peft_adapter(tmp_path / "a", tiny_dir, 4, ["q_proj", "v_proj"], 1),
               peft_adapter(tmp_path / "b", tiny_dir, 2, ["q_proj", "k_proj", "o_proj"], 2, rslora=True),
               peft_adapter(tmp_path / "c", tiny_dir, 3, ["v_proj", "up_proj"], 3)]
    files = [write_rows(tmp_path / f"{t}.jsonl", task_rows(t, 4)) for t in ("sentiment", "nli", "qa")]
    out = tmp_path / "merged"
    merge_adapters.main(["--method", "task_arithmetic", "--model", str(tiny_dir), "--rows", ",".join(map(str, files)),
                         "--out", str(out), *map(str, folders)])
    record = json.loads((out / "merge.json").read_text())
    candidates = record["selection"]["candidates"]
    assert len(candidates) >= 4 and record["params"] == min(candidates, key=lambda c: c["val_loss"])["params"]
    lam = record["params"]["lam"]

    updates = [dense_updates(f) for f in folders]
    union = set().union(*updates)
    assert len(union) == 2 * 5  # q, k, v, o, up in each of the 2 layers
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float64).eval()
    with torch.no_grad():
        for name in union:
            weight = reference.get_submodule(name).weight
            weight += lam * sum(u[name] for u in updates if name in u)
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    ids = torch.tensor([tokenizer("Three adapters, merged on the user's rows: ### Answer:\n").input_ids])
    with torch.no_grad():
        want, got = reference(ids).logits, served(ids).logits.double()
        with served.disable_adapter():
            base = served(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (base.double() - want).abs().max() > 1e-2 * want.abs().max()  # the merge moved the logits


def test_incompatible_adapters_are_refused_in_one_line(tiny_dir, model, adapters, tmp_path, capsys):
    """Adapters whose modules have other shapes (made for another base model): against each other, and against the
    --model their rows are run on; exit 2, nothing written."""
    names = peft_files.load_adapter(adapters[0]).modules
    other = tmp_path / "other"
    peft_files.save_adapter(lora.Adapter({n: lora.Lora(torch.randn(2, 16), torch.randn(24, 2), 1.0) for n in names},
                                   "other"), other)
    err = run_error(["--method", "ties", "--out", str(tmp_path / "o1"), str(adapters[0]), str(other)], capsys)
    assert "different (d_in, d_out) shapes" in err
    files = [write_rows(tmp_path / f"{t}.jsonl", task_rows(t, 2)) for t in ("sentiment", "nli")]
    err = run_error(["--method", "ties", "--model", str(tiny_dir), "--rows", ",".join(map(str, files)),
                     "--out", str(tmp_path / "o2"), str(other), str(other)], capsys)
    assert f"{other} does not fit --model" in err and "weight (32, 32)" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and not list(tmp_path.glob(".o*"))


def test_regmean_from_the_command_on_the_users_rows(tiny_dir, model, adapters, tmp_path, capsys):
    """--method regmean --rows: each adapter's Gram matrices from its file's rows (a user's file does not say which
    rows the adapter trained on), alpha chosen on the same rows; the adapter written is merges.regmean of Grams
    collected here with merge_fit.gram_matrices on those rows."""
    import merge_adapters

    files = [write_rows(tmp_path / f"{t}.jsonl", task_rows(t, 4)) for t in ("sentiment", "nli")]
    merge_adapters.main(["--method", "regmean", "--model", str(tiny_dir), "--rows", ",".join(map(str, files)),
                         "--out", str(tmp_path / "rm"), *map(str, adapters[:2])])  # ranks 4 and 2 (rsLoRA)
    record = json.loads((tmp_path / "rm" / "merge.json").read_text())
    candidates = record["selection"]["candidates"]
    assert record["params"] == min(candidates, key=lambda c: c["val_loss"])["params"] and record["params"]["rows"] == 4
    assert record["gram_rows"][str(files[0])]["lines"] == [1, 4]
    out = capsys.readouterr().out
    assert "<- chosen" in out and "one pass over each adapter's rows" in out.split("regmean: 2 adapters, ")[1]
    # a budget below one input's statistics: refused in one line naming the flag, before any pass, nothing written
    err = run_error(["--method", "regmean", "--model", str(tiny_dir), "--rows", ",".join(map(str, files)),
                     "--memory", "1e-6", "--out", str(tmp_path / "small"), *map(str, adapters[:2])], capsys)
    assert "for the Gram statistics of one input" in err and "raise --memory GB" in err
    assert not (tmp_path / "small").exists()
    m, tokenizer = model
    loaded = [peft_files.load_adapter(a) for a in adapters[:2]]
    rows = [merge_fit.FileRows.read(f).examples(4, tokenizer, 512)[0] for f in files]
    grams = [merge_fit.gram_matrices(m, a, r, 8, tokenizer.eos_token_id) for a, r in zip(loaded, rows)]
    written = peft_files.load_adapter(tmp_path / "rm")
    for name, got in written.modules.items():
        want = merges.regmean([a.modules[name] for a in loaded], [g[name] for g in grams], record["params"]["alpha"])
        assert got.A.shape[0] == 6 and torch.allclose(got.delta(), want.delta(), rtol=1e-4, atol=1e-6), name
