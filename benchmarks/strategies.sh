#!/usr/bin/env bash
# Runs every variant of the ants/bees and sign-language configs, one after another, and prints a table row per
# run from its summary.json: config, strategy, epochs, best val acc, final val acc, test acc, train min, wall min.
# Usage: JAXTL_DATA_DIR=../shared/data bash benchmarks/strategies.sh [RUNS_DIR [CONFIG[:VARIANT]...]]
#        (default: every variant of configs/ants_bees.py and configs/sign_language.py but `auto`, which tries
#        several of them within its own budget: run it on its own)
set -euo pipefail
runs="${1:-runs}"
shift || true
specs=("$@")
if [ ${#specs[@]} -eq 0 ]; then
  for config in configs/ants_bees.py configs/sign_language.py; do
    for variant in $(python -c "import runpy; print(' '.join(v for v in runpy.run_path('$config')['VARIANTS'] if v != 'auto'))"); do
      specs+=("$config:$variant")
    done
  done
fi
mkdir -p "$runs"
for spec in "${specs[@]}"; do
  name=$(basename "${spec%%:*}" .py)${spec#"${spec%%:*}"}
  name=${name/:/_}
  start=$(date +%s)
  python run.py train --config "$spec" --workdir "$runs/$name" --config.progress=False > "$runs/$name.log" 2>&1
  wall=$(( $(date +%s) - start ))
  python - "$runs/$name/summary.json" "$name" "$wall" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
test = s.get("test_accuracy")
final = s.get("final_val_accuracy")
print(f"| {sys.argv[2]} | {s['strategy']} | {s['epochs'] or 'L-BFGS'} | {s['best_val_accuracy']:.3f} | "
      f"{'-' if final is None else f'{final:.3f}'} | {'-' if test is None else f'{test:.3f}'} | "
      f"{s['train_seconds'] / 60:.1f} | {int(sys.argv[3]) / 60:.1f} |", flush=True)
PY
done
