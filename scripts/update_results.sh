#!/usr/bin/env bash
# For maintainers: commit a finished `make reproduce` run ($REPRODUCE_ROOT, default runs/reproduce) as the
# repository's results. Copies its result files, training logs and stage times into results/<model>/ (replacing the
# methods it ran; the others stay), then rebuilds every summary and the generated parts of README.md and REPORT.md.
# A method kept from before that was computed on other adapters (another CPU's bytes) is then left out of the
# summaries and named there: rerun it on the new adapters, or do not commit the run.
set -euo pipefail
source "$(dirname "$0")/common.sh"
root=${REPRODUCE_ROOT:-runs/reproduce}
results_root=${RESULTS_ROOT:-.}   # the repository whose results/ receives the run (tests: a scratch folder)
slug=$(basename "$MODEL")
src="$root/results/$slug" dest="$results_root/results/$slug"
[ -d "$src" ] || { echo "no run in $src: run make reproduce first (or set REPRODUCE_ROOT)" >&2; exit 2; }
shopt -s nullglob   # a task set without some kind of file copies none of it instead of failing on the pattern
for n in 5 7; do
    files=("$src/$n-task/"*.json "$src/$n-task/"*.predictions.jsonl)
    [ ${#files[@]} -gt 0 ] || continue
    mkdir -p "$dest/$n-task"
    cp "${files[@]}" "$dest/$n-task/"
done
[ -d "$src/train_logs" ] && cp -r "$src/train_logs" "$dest/"
cp "$src"/reproduce_times*.md "$dest/" 2>/dev/null || true
$PYTHON -c "import sys; from pathlib import Path; from src.reporting import main; main(Path(sys.argv[1]))" "$results_root"
echo "copied $src into $dest; review git diff results/ before committing (the run's adapters stay in $root/adapters)"
