"""The README's examples run as written: each block marked `<!-- tested: NAME -->` is taken from README.md and run
on tiny PEFT adapters, a tiny model and rows from the shipped data, only its placeholders (the base model and the
adapter folders) pointed at those. So the front page cannot drift from the code."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_model
from src import peft_files
from src.models import load_model
from test_merge_adapters import make_adapter, task_rows, write_rows

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- tested: (?P<name>[\w-]+) -->\n```(?P<lang>\w+)\n(?P<code>.*?)```", re.DOTALL)


def readme_block(name: str) -> str:
    blocks = {m.group("name"): m.group("code") for m in BLOCK.finditer((REPO / "README.md").read_text())}
    assert name in blocks, f"README.md has no block marked <!-- tested: {name} -->"
    return blocks[name]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model folder and two PEFT adapters of ranks 4 and 2 on its q and v projections."""
    root = tmp_path_factory.mktemp("readme")
    folder = save_tiny_model(root / "tiny")
    model, _ = load_model(str(folder))
    return folder, [make_adapter(root / "lora_a", model, 4, 1), make_adapter(root / "lora_b", model, 2, 2)]


@pytest.mark.slow
def test_merge_your_own_adapters_runs_as_written(tiny, tmp_path):
    folder, (a, b) = tiny
    code = readme_block("merge-your-own")
    placeholders = {"BASE": folder, "A": a, "B": b}
    lines = code.splitlines()
    for name, value in placeholders.items():   # the placeholders, and only they, are replaced
        line = next(i for i, text in enumerate(lines) if text.startswith(f"{name}="))
        lines[line] = f"{name}={value}"
    write_rows(tmp_path / "rows_a.jsonl", task_rows("sentiment", 12))
    write_rows(tmp_path / "rows_b.jsonl", task_rows("nli", 12))
    (tmp_path / "merge_adapters.py").symlink_to(REPO / "merge_adapters.py")   # `python merge_adapters.py` from here
    bindir = Path(sys.executable).parent   # the environment running the tests has a `python` there (a venv's bin)
    assert (bindir / "python").exists()
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "merged-ties" / "merge.json").read_text())["params"] == {"density": 0.3, "lam": 1.0}
    record = json.loads((tmp_path / "merged-regmean" / "merge.json").read_text())
    assert record["method"] == "regmean" and record["params"]["rows"] == 128   # --select-rows: all 12 of each file
    assert record["gram_rows"]["rows_a.jsonl"]["rows"] == 12
    merged = peft_files.load_adapter(tmp_path / "merged-regmean")
    assert {f.A.shape[0] for f in merged.modules.values()} == {6}   # rank 4 + 2: an exact LoRA
    small = peft_files.load_adapter(tmp_path / "merged-regmean-r8")   # rank 8 >= 6: RegMean itself, as the exact LoRA
    assert {f.A.shape[0] for f in small.modules.values()} == {6}
    assert json.loads((tmp_path / "merged-regmean-r8" / "merge.json").read_text())["params"]["rank"] == 8
    fixed = json.loads((tmp_path / "merged-regmean-fixed" / "merge.json").read_text())
    assert fixed["params"]["alpha"] == 0.9 and "selection" not in fixed
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged-model") is not None
    assert "regmean: 2 adapters" in proc.stdout   # the memory plan, printed before the passes


def test_the_python_example_runs_as_written(tiny, tmp_path, monkeypatch):
    _, (a, b) = tiny
    code = readme_block("python-api")
    assert '"path/to/lora_a", "path/to/lora_b"' in code
    monkeypatch.chdir(tmp_path)
    exec(code.replace("path/to/lora_a", str(a)).replace("path/to/lora_b", str(b)), {})
    merged, want = peft_files.load_adapter(tmp_path / "merged-iso-cts"), [peft_files.load_adapter(p) for p in (a, b)]
    from src import merges

    expected = merges.merge(want, "iso_cts")
    for name, f in merged.modules.items():
        assert torch.allclose(f.delta(), expected.modules[name].delta(), rtol=1e-5, atol=1e-7), name


def test_the_readmes_regmean_memory_table_is_the_formula():
    """8 bytes x layers x the sum of d_in^2 over a layer's distinct inputs: attention, q/k/v's input and o's (both
    hidden wide); all linear layers adds gate/up's (hidden) and down's (intermediate). The leading term of
    merge_fit.plan_passes' bytes per input; the table rounds it as printed."""
    shapes = {"Qwen2-0.5B": (896, 4864, 24), "Qwen2-1.5B": (1536, 8960, 28), "Llama-3-8B": (4096, 14336, 32)}
    readme = (REPO / "README.md").read_text()
    for name, (hidden, inter, layers) in shapes.items():
        row = next(line for line in readme.splitlines() if line.startswith(f"  | {name} |"))
        attention, every = (float(re.search(r"([\d.]+) GB", cell).group(1)) for cell in row.split("|")[2:4])
        assert attention == round(8 * layers * 2 * hidden ** 2 / 1e9, 2 if attention < 2 else 1), name
        assert every == round(8 * layers * (3 * hidden ** 2 + inter ** 2) / 1e9, 1), name
