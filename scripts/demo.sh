#!/usr/bin/env bash
# The CPU demo, from a fresh clone: set-up, a 6x6 Sudoku dataset generated offline, a small HRM trained on
# CPU, evaluated on 500 held-out puzzles, exact accuracy printed. Extra arguments go to pretrain.py
# (e.g. `bash scripts/demo.sh epochs=4`). `arch=trm` trains TRM instead (the recipe trm_cpu_demo, same data
# and schedule); `experiment=NAME` names another recipe. SKIP_SETUP=1 skips scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# One intra-op thread: this model is small, and two OpenMP threads on a core shared with any other busy
# process slow down by over 10x (threads wait for each other); one thread only shares fairly.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
setup_done=$(date +%s)
EXPERIMENT=sudoku_cpu_demo
ARGS=()
for arg in "$@"; do
  case "$arg" in
    arch=trm) EXPERIMENT=trm_cpu_demo ;;  # the TRM recipe selects arch=trm itself
    experiment=*) EXPERIMENT=${arg#experiment=} ;;
    *) ARGS+=("$arg") ;;
  esac
done
[ -f "config/experiment/$EXPERIMENT.yaml" ] || { echo "demo: no recipe config/experiment/$EXPERIMENT.yaml" >&2; exit 2; }
DATA=${DEMO_DATA:-data/sudoku-6x6-demo}
RUN=${DEMO_RUN:-checkpoints/demo/${EXPERIMENT%_cpu_demo}-6x6}
if [ ! -f "$DATA/train/dataset.json" ]; then
  .venv/bin/python -m dataset.build_sudoku_dataset --generate 20000 --grid 6 --blanks 8..12 --test-size 500 \
    --seed 0 --output-dir "$DATA"
fi
rm -rf "$RUN"  # a fresh run each time (the same run dir would otherwise auto-resume)
.venv/bin/python pretrain.py experiment="$EXPERIMENT" data_path="$DATA" checkpoint_path="$RUN" ${ARGS[@]+"${ARGS[@]}"}
latest=$(ls -d "$RUN"/step_* | sort -t_ -k2 -n | tail -1)
.venv/bin/python evaluate.py checkpoint="$latest"
.venv/bin/python - "$latest/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
def pct(x):  # enough digits that a rate below 1 never prints as 100 %
    d = 1
    while d < 6 and x < 1 and round(100 * x, d) >= 100:
        d += 1
    return f"{100 * x:.{d}f}%"
print(f"demo: exact accuracy {pct(m['eval/exact_accuracy'])} on {int(m['eval/num_examples'])} held-out 6x6 "
      f"puzzles (cell accuracy {pct(m['eval/accuracy'])})")
PY
end=$(date +%s)
echo "demo: $((end - setup_done)) s for data + training + evaluation ($((setup_done - start)) s set-up)"
