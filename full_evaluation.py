"""Evaluate base / single / MoA and every merge on a task list; write results/<model>/<N>-task/.

    python full_evaluation.py                                  # the task list below, every default method
    python full_evaluation.py --tasks all --methods concat,svd
    python full_evaluation.py --tasks all --methods paper        # base, majority, single, moa, concat, weight_sum, svd
    python full_evaluation.py --methods ties,ties_dense --set ties.density=0.5   # fix a merge's parameter
    python full_evaluation.py --tasks all --methods regmean,ties,ctm --rank 8    # regmean_r8, ...: one rank-8 LoRA
    python full_evaluation.py --model Qwen/Qwen2-1.5B --preset paper --data hub
    python full_evaluation.py --tasks all --methods cat,lorahub,regmean --loras random   # the random-LoRA control
    accelerate launch full_evaluation.py --model Qwen/Qwen2-1.5B --preset paper --data hub   # rows shared over GPUs

Edit the task list below (the original's "line 30") or pass --tasks. The five-task set of the paper is
summarization, translation, qa, sentiment, nli; add paraphrasing and commonsense for the seven-task set.
"""
from src import cli, settings
from src.evaluation import EVAL_PRESETS, EvalConfig, evaluate, make_eval_config, parse_merge_params, parse_methods
from src.layout import ALL_METHODS, METHODS, results_dir
from src.tasks import parse_tasks
from src.train import make_accelerator

# ---------------------------------------------------------------------------------------------------------------
# The tasks to evaluate: edit this list (or pass --tasks).
tasks = ["summarization", "translation", "qa", "sentiment", "nli"]
# tasks = ["summarization", "translation", "qa", "sentiment", "nli", "paraphrasing", "commonsense"]
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    p = cli.common_parser(__doc__.splitlines()[0], EVAL_PRESETS)
    p.add_argument("--tasks", default=",".join(tasks), help="comma-separated task list, or 'all'")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated, from paper (the thesis's methods and baselines)," + ",".join(ALL_METHODS))
    settings.add_flags(p, EvalConfig, ["rows", "batch_size", "max_prompt", "max_new_tokens", "select_rows", "seed",
                                       "loras"],
                       EVAL_PRESETS)
    p.add_argument("--rank", type=int, default=None,
                   help="every merge of --methods truncated to this rank, as <merge>_r<rank> (regmean_r8: RegMean's "
                        "best rank-8 LoRA in its own objective; ctm: its subspace rank; the others: the truncated SVD "
                        "of their merge); one variant alone: --methods regmean_r8")
    p.add_argument("--set", action="append", default=None, metavar="METHOD.PARAM=VALUE",
                   help="fix a merge's hyperparameter (else its default, or the best of its grid on validation rows); "
                        "python merge_adapters.py --help lists them")
    p.add_argument("--no-reuse", action="store_true",
                   help="recompute base/single even where another task set's run with the same settings has them")
    args = p.parse_args(argv)
    merge_params = parse_merge_params(args.set)
    task_list, methods = parse_tasks(args.tasks), parse_methods(args.methods, args.rank, merge_params)
    cfg = make_eval_config(args.preset, {**cli.config_flags(args, "tasks", "methods", "set", "no_reuse", "rank"),
                                         "merge_params": {m: p for m, p in merge_params.items() if p}})
    accelerator = make_accelerator()
    evaluate(cfg, task_list, methods, root=args.root, reuse=not args.no_reuse, accelerator=accelerator)
    if accelerator.is_main_process:
        print((results_dir(args.root, args.model, task_list) / "summary.md").read_text())


if __name__ == "__main__":
    cli.run(main)
