"""Train the Mixture-of-LoRAs routers over the frozen task LoRAs; save to adapters/<model>/moa-<N>/.

    python train_moa.py                                   # the task list of full_evaluation.py
    python train_moa.py --tasks all --model Qwen/Qwen2-1.5B --preset paper --data hub

Needs each task's adapter (train_individual_loras.py). Prints the routing accuracy on held-out prompts.
"""
import full_evaluation
from src import cli
from src import lora as L
from src.evaluation import adapter_dir, moa_dir, train_command
from src.models import load_model
from src.tasks import parse_tasks
from src.train import make_config, train_routers


def main(argv=None):
    p = cli.common_parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(full_evaluation.tasks), help="comma-separated task list, or 'all'")
    for flag, kind in [("router-lr", float), ("router-epochs", int), ("router-batch-size", int),
                       ("router-rows", int), ("router-heldout", int), ("max-prompt", int), ("seed", int)]:
        p.add_argument(f"--{flag}", type=kind, default=None, help="overrides the preset")
    args = p.parse_args(argv)
    tasks = parse_tasks(args.tasks)
    cfg = make_config(args.preset, vars(args))
    adapters = [L.load_adapter(adapter_dir(args.root, args.model, t), hint=train_command(args.model, args.preset, t))
                for t in tasks]
    model, tokenizer = load_model(args.model)
    out = moa_dir(args.root, args.model, tasks)
    accuracy = train_routers(cfg, tasks, model, tokenizer, adapters, out)
    print(f"routers for {', '.join(tasks)} -> {out}; held-out routing accuracy {accuracy['accuracy']:.3f} "
          f"({accuracy['n_prompts']} prompts, {len(accuracy['per_layer'])} layers)")


if __name__ == "__main__":
    cli.run(main)
