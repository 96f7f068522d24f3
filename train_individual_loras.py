"""Train one LoRA per task on the base model and save it in PEFT format to adapters/<model>/<task>/.

    python train_individual_loras.py --task sentiment                     # embedded model, cpu preset, shipped data
    python train_individual_loras.py --task all --model Qwen/Qwen2-1.5B --preset paper --data hub
    python train_individual_loras.py --task qa --resume                   # continue from the last checkpoint
    accelerate launch train_individual_loras.py --task qa --preset paper ...   # one task data-parallel on N GPUs

Every hyperparameter of the preset (src/train.py) can be overridden by its flag.
"""

from src import cli, settings
from src.layout import adapter_dir, model_results_dir
from src.models import load_model
from src.tasks import parse_tasks
from src.train import PRESETS, TrainConfig, make_accelerator, make_config, publish_log, train_lora


def main(argv=None):
    p = cli.common_parser(__doc__.splitlines()[0], PRESETS)
    p.add_argument("--task", required=True, help="a task name, a comma-separated list, or 'all'")
    p.add_argument("--resume", action="store_true", help="continue from adapters/<model>/<task>/checkpoint.safetensors")
    settings.add_flags(p, TrainConfig, ["r", "alpha", "targets", "lr", "batch_size", "epochs", "max_steps", "train_rows",
                                        "val_rows", "max_len", "max_target", "eval_every", "patience", "save_every",
                                        "seed"], PRESETS)
    args = p.parse_args(argv)
    tasks = parse_tasks(args.task)
    configs = [make_config(args.preset, {**cli.config_flags(args, "resume"), "task": t}) for t in tasks]
    accelerator = make_accelerator()
    model, tokenizer = load_model(args.model, device=accelerator.device)
    for cfg in configs:
        out = adapter_dir(args.root, args.model, cfg.task)
        summary = train_lora(cfg, model, tokenizer, out, resume=args.resume, accelerator=accelerator)
        if not accelerator.is_main_process:
            continue
        publish_log(out, model_results_dir(args.root, args.model) / "train_logs" / f"{cfg.task}.jsonl")
        skipped = f", {summary['skipped_rows']} rows longer than --max-len skipped" if summary["skipped_rows"] else ""
        print(f"{cfg.task}: {summary['steps']} steps on {summary['processes']} process(es), best validation loss "
              f"{summary['best_val_loss']:.4f}{skipped} -> {out}")


if __name__ == "__main__":
    cli.run(main)
