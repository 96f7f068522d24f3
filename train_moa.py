"""Train the Mixture-of-LoRAs routers over the frozen task LoRAs; save to adapters/<model>/moa-<N>/.

    python train_moa.py                                   # the task list of full_evaluation.py
    python train_moa.py --tasks all --model Qwen/Qwen2-1.5B --preset paper --data hub
    python train_moa.py --tasks summarization,translation,qa,sentiment,nli --tasks all    # two sets, one pass
    accelerate launch train_moa.py --tasks all ...        # router features computed on several GPUs

Needs each task's adapter (train_individual_loras.py). With several --tasks, the router features (which depend
only on a prompt and its gold adapter) are computed once for all sets. With --router-try-rows (the cpu preset: the
first 48 of the LoRAs' 400 rows) routers are also trained on fewer rows, and the count whose routers route held-out
prompts more accurately is kept. Prints the routing accuracy on other held-out prompts, and copies it with the
settings, the rows tried and the loss curve to results/<model>/train_logs/moa-<N>.json.
"""
import full_evaluation
from src import cli, peft_files, settings
from src.layout import adapter_dir, model_results_dir, moa_dir, router_log, train_command
from src.models import load_model
from src.tasks import parse_tasks
from src.train import PRESETS, TrainConfig, check_task_sets, make_accelerator, make_config, publish_log, train_routers


def main(argv=None):
    p = cli.common_parser(__doc__.splitlines()[0], PRESETS)
    p.add_argument("--tasks", action="append", default=None,
                   help="comma-separated task list, or 'all'; repeat for several sets (default: full_evaluation.tasks)")
    settings.add_flags(p, TrainConfig, ["router_lr", "router_epochs", "router_batch_size", "router_rows",
                                        "router_try_rows", "router_heldout", "router_select", "max_prompt", "seed"],
                       PRESETS)
    args = p.parse_args(argv)
    task_sets = [parse_tasks(t) for t in (args.tasks or [",".join(full_evaluation.tasks)])]
    check_task_sets(task_sets)  # before the adapters and the model load
    cfg = make_config(args.preset, cli.config_flags(args, "tasks"))
    union = list(dict.fromkeys(t for tasks in task_sets for t in tasks))
    adapters = {t: peft_files.load_adapter(adapter_dir(args.root, args.model, t), hint=train_command(args.model, args.preset, t))
                for t in union}
    accelerator = make_accelerator()
    model, tokenizer = load_model(args.model, device=accelerator.device)
    outs = [moa_dir(args.root, args.model, tasks) for tasks in task_sets]
    accuracies = train_routers(cfg, task_sets, model, tokenizer, adapters, outs, accelerator)
    for tasks, out, accuracy in zip(task_sets, outs, accuracies):
        if accuracy is not None:
            lo, hi = accuracy["interval"]
            print(f"routers for {', '.join(tasks)} -> {out}; held-out routing accuracy {accuracy['accuracy']:.3f} "
                  f"[{lo:.3f}, {hi:.3f}] ({accuracy['n_prompts']} prompts, {len(accuracy['per_layer'])} layers)")
            publish_log(out, router_log(model_results_dir(args.root, args.model), len(tasks)), name="routers.json")


if __name__ == "__main__":
    cli.run(main)
