#!/usr/bin/env bash
# Runs every strategy config on ants/bees and the sign-language pair, one after another, and prints a table
# row per run from its summary.json.
# Usage: JAXTL_DATA_DIR=../shared/data bash benchmarks/strategies.sh [RUNS_DIR [CONFIG...]] (default: all of them)
set -euo pipefail
runs="${1:-runs}"
shift || true
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(configs/ants_bees*.py configs/sign_language_*.py)
mkdir -p "$runs"
for config in "${configs[@]}"; do
  name=$(basename "$config" .py)
  start=$(date +%s)
  python run.py train --config "$config" --workdir "$runs/$name" --config.progress=False > "$runs/$name.log" 2>&1
  wall=$(( $(date +%s) - start ))
  python - "$runs/$name/summary.json" "$name" "$wall" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
test = s.get("test_accuracy")
print(f"| {sys.argv[2]} | {s['strategy']} | {s['epochs'] or 'L-BFGS'} | {s['best_val_accuracy']:.3f} | {s['final_val_accuracy']:.3f} | "
      f"{'-' if test is None else f'{test:.3f}'} | {s['train_seconds'] / 60:.1f} | {int(sys.argv[3]) / 60:.1f} |", flush=True)
PY
done
