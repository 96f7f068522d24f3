"""What the scripts share: common flags, and one-line errors instead of tracebacks for bad input (BadInput only:
every other exception, a CUDA out-of-memory or a shape bug, keeps its traceback)."""
import argparse
import sys

from .errors import BadInput
from .models import EMBEDDED
from .settings import DATA


def common_parser(description: str, presets: dict) -> argparse.ArgumentParser:
    """The flags every stage takes: the model, the data, the preset (one of `presets`) and the root folder."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=EMBEDDED, help="hub id (Qwen/Qwen2-1.5B), local folder, or the embedded default")
    p.add_argument("--data", default="local", choices=DATA.choices, help="shipped samples or the paper's hub datasets")
    p.add_argument("--preset", default="cpu", choices=list(presets), help="hyperparameters (flags override them)")
    p.add_argument("--root", default=".", help="folder holding adapters/ and results/")
    return p


def config_flags(args: argparse.Namespace, *script_only: str) -> dict:
    """The parsed flags that are settings of a config dataclass: every flag but `--root` and the script's own
    (`script_only`). make_config rejects a key it does not know, so a flag added to a script without a setting
    behind it fails at once instead of being dropped."""
    return {k: v for k, v in vars(args).items() if k not in {"root", *script_only}}


def run(main):
    """Call main(); bad input (unknown task, missing or corrupt file, ...) exits 2 with its one-line message."""
    try:
        main()
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
