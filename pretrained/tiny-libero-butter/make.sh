#!/usr/bin/env bash
# Rebuild the shipped tiny checkpoints (`make pretrained`). Resumable: data generation skips
# finished demos and every training run continues from its last saved state.
# The three runs share the cores, one thread each; here they took 28-86 min beside other jobs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${WORK:-$here/../../runs/tiny-libero-butter}"
export OMP_NUM_THREADS=1
edge-vla data generate --out "$work/data" \
    --tasks LIVING_ROOM_SCENE2_pick_up_the_butter_and_put_it_in_the_basket \
    --demos-per-task 53 --image-size 64 --seed 0
common=(--data "$work/data" --set steps=1500 --set action_chunk=4 --set lr=1e-3 --set warmup_steps=50
        --set save_every=250 --no-progress)
declare -A extra=([ecot]="" [ecot-lite-dropout]="--set recipe_options.per_batch=true" [vla]="")
pids=()
for r in ecot ecot-lite-dropout vla; do
    resume=""; [ -f "$work/$r/train_config.json" ] && resume="--resume"
    # shellcheck disable=SC2086
    edge-vla train --recipe "$r" --out "$work/$r" "${common[@]}" ${extra[$r]} $resume &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done  # fails if any run failed
for r in ecot ecot-lite-dropout vla; do  # ship: the final checkpoint and the run's summary
    rm -rf "${here:?}/$r" && mkdir -p "$here/$r"
    cp -r "$work/$r/final/." "$here/$r/"
    cp "$work/$r/summary.json" "$here/$r/train_summary.json"
done
echo "checkpoints in $here"
