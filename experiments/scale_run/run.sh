#!/bin/bash
# The whole PEP workflow at scale (issue 26, item 3): a Criteo-format file with a planted model,
# encoded, searched, retrained, exported and served, beside the full-table model on the same
# split. Every stage runs under /usr/bin/time -v (wall time, peak RSS) at nice 10; its stdout,
# stderr and time report go to $LOGS. Generated data stays in $DATA, out of git.
#
#   bash experiments/scale_run/run.sh            # LINES=2000000 DATA=/work/data-26 by default
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's pep_kernels, also for the pep command
LINES=${LINES:-2000000}
DATA=${DATA:-/work/data-26}
FILE=$DATA/criteo_like_$LINES.txt
CACHE=$DATA/cache
RUN=$DATA/run-fm-$LINES
LOGS=${LOGS:-experiments/scale_run/logs-$LINES}
EPOCHS=${EPOCHS:-2}                  # of the search (its plan spans them)
RETRAIN_EPOCHS=${RETRAIN_EPOCHS:-10}  # at most, for the retrains and the full-table model (patience 2)
export OMP_WAIT_POLICY=PASSIVE  # torch's default spinning threads crawl on a shared, busy machine
mkdir -p "$DATA" "$LOGS"
DATA_ARGS=(--data "criteo=$FILE" --cache-dir "$CACHE")

stage() {  # stage NAME COMMAND...: skipped when its time report exists (a finished stage)
    local name=$1; shift
    [[ -s "$LOGS/$name.time" ]] && { echo "$name: done before"; return; }
    echo "$name: $*"
    /usr/bin/time -v -o "$LOGS/$name.time.partial" nice -n 10 "$@" > "$LOGS/$name.out" 2> "$LOGS/$name.err"
    mv "$LOGS/$name.time.partial" "$LOGS/$name.time"
}

if [[ ! -s "$FILE" ]]; then
    stage generate python -c "import numpy as np; from pep_kernels.data import write_criteo_like_file
np.save('$FILE.planted.npy', write_criteo_like_file('$FILE', $LINES, seed=0))"
fi
stage encode python -c "from pep_kernels.data import load_criteo; d = load_criteo('$FILE', cache_dir='$CACHE')
print(len(d), sum(d.field_dims), d.field_dims)"
stage baseline python experiments/scale_run/baseline.py "$FILE" "$FILE.planted.npy" --cache-dir "$CACHE" \
    --epochs "$RETRAIN_EPOCHS"
stage search pep search "${DATA_ARGS[@]}" --model fm --budgets 0.9 0.95 0.97 --epochs "$EPOCHS" --out "$RUN"
stage retrain pep retrain "${DATA_ARGS[@]}" --run "$RUN" --epochs "$RETRAIN_EPOCHS"
for model in "$RUN"/retrained-snapshot-step*.safetensors; do
    step=$(basename "$model" .safetensors)
    stage "export-$step" pep export --model-file "$model" --out "$RUN/$step.store"
    stage "evaluate-$step" pep evaluate "${DATA_ARGS[@]}" --model-file "$model"
    stage "evaluate-store-$step" pep evaluate "${DATA_ARGS[@]}" --model-file "$model" --store "$RUN/$step.store"
done
cp "$RUN/search.json" "$RUN/planned_vs_reached.png" "$LOGS/"
python experiments/scale_run/summarize.py "$LOGS" > "$LOGS/summary.md"
cat "$LOGS/summary.md"
