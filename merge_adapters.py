"""Merge LoRA adapters in PEFT's format (ours, or trained with PEFT) into one PEFT adapter.

    python merge_adapters.py --method svd --rank 8 --out merged/ adapters/smollm2-135m/qa adapters/smollm2-135m/nli
    python merge_adapters.py --method ties --density 0.3 --lam 1.0 --out ties/ path/to/a path/to/b path/to/c
    python merge_adapters.py --method weight_sum --weights 0.5,0.5 --out avg/ path/to/a path/to/b

The result loads with `peft.PeftModel.from_pretrained(base_model, "merged/")` or with src.lora.load_adapter.
Every data-free merge of src/merges.py is a --method; its hyperparameters are flags (default: the method's
default; the grids that full_evaluation.py searches need data and are not searched here). CAT and LoraHub learn
from train rows: use full_evaluation.py --methods cat,lorahub.
"""
import argparse

from src import cli
from src import lora
from src import merges
from src.errors import BadInput


def parser() -> argparse.ArgumentParser:
    data_free = {n: m for n, m in merges.METHODS.items() if m.space != "data"}
    lines = [f"  {n:16} {m.formula} [{m.paper}]" + (f"; {', '.join(f'{k}={p.default}' for k, p in m.params.items())}"
                                                  if m.params else "") for n, m in data_free.items()]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="methods:\n" + "\n".join(lines),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="+", help="adapter folders (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--method", required=True, choices=list(data_free))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--weights", default=None, help="comma-separated, one per adapter (default: 1, or 1/N for svd)")
    p.add_argument("--seed", type=int, default=None, help="DARE's random masks (default 0; only the DARE methods take it)")
    p.add_argument("--rank", type=int, default=None, help="truncate the merge to this rank (svd: default 8)")
    params = {}
    for m in data_free.values():
        for k, prm in m.params.items():
            if k != "rank":
                params.setdefault(k, prm)
    for name, prm in params.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                       help=f"{prm.help} (methods: {', '.join(n for n, m in data_free.items() if name in m.params)})")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    method = merges.get_method(args.method)
    given = {k: v for k, v in vars(args).items() if k in method.params and v is not None}
    general = ("adapters", "method", "out", "weights", "seed", "rank")
    other = [k for k, v in vars(args).items() if v is not None and k not in method.params and k not in general]
    if other:
        raise BadInput(f"--{other[0].replace('_', '-')} is not a parameter of {args.method} (it takes "
                       f"{', '.join(method.params) or 'none'})")
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        raise BadInput(f"--weights {args.weights!r}: give comma-separated numbers, one per adapter") from None
    if weights is not None and len(weights) != len(args.adapters):
        raise BadInput(f"--weights has {len(weights)} values for {len(args.adapters)} adapters: give one per adapter")
    seed = {"seed": args.seed} if args.seed is not None else {}
    truncate = {} if "rank" in method.params else {"rank": args.rank}  # svd: --rank is its own parameter
    merges.check_arguments(method, **seed, **truncate)  # every flag checked before an adapter is read
    merges.resolve_params(method, given)
    adapters = [lora.load_adapter(a) for a in args.adapters]
    merged = merges.merge(adapters, args.method, weights=weights, **seed, **truncate, **given)
    lora.save_adapter(merged, args.out)
    print(f"{args.method} of {len(adapters)} adapters ({len(merged.modules)} modules) -> {args.out}")


if __name__ == "__main__":
    cli.run(main)
