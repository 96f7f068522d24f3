"""Merge LoRA adapters in PEFT's format (ours, or trained with PEFT) into one PEFT adapter.

    python merge_adapters.py --method svd --rank 8 --out merged/ adapters/smollm2-135m/qa adapters/smollm2-135m/nli
    python merge_adapters.py --method weight_sum --weights 0.5,0.5 --out avg/ path/to/a path/to/b

The result loads with `peft.PeftModel.from_pretrained(base_model, "merged/")` or with src.lora.load_adapter.
Methods: concat (sum of updates, rank = sum of ranks), weight_sum (sum of the factors: the paper's "weight
summing"), svd (rank-r truncation of the weighted mean update, computed without forming dense matrices).
"""
import argparse

from src import cli
from src import lora as L


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("adapters", nargs="+", help="adapter folders (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--method", required=True, choices=list(L.MERGES))
    p.add_argument("--weights", default=None, help="comma-separated, one per adapter (default: 1, or 1/N for svd)")
    p.add_argument("--rank", type=int, default=8, help="rank of the svd merge")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    adapters = [L.load_adapter(a) for a in args.adapters]
    merged = L.merge(adapters, args.method, weights=weights, **({"rank": args.rank} if args.method == "svd" else {}))
    L.save_adapter(merged, args.out)
    print(f"{args.method} of {len(adapters)} adapters ({len(merged.modules)} modules) -> {args.out}")


if __name__ == "__main__":
    cli.run(main)
