#!/usr/bin/env bash
# Rebuild the shipped tiny checkpoints (`make pretrained`). Resumable: data generation skips
# finished demos and every training run continues from its last saved state.
# The three runs of a phase share the cores, one thread each; here the first phase took
# 28-86 min beside other jobs, the second 6-18 min.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${WORK:-$here/../../runs/tiny-libero-butter}"
export OMP_NUM_THREADS=1
edge-vla data generate --out "$work/data" \
    --tasks LIVING_ROOM_SCENE2_pick_up_the_butter_and_put_it_in_the_basket \
    --demos-per-task 53 --image-size 64 --seed 0
common=(--data "$work/data" --set action_chunk=4 --set lr=1e-3 --set warmup_steps=50 --no-progress)
declare -A extra=([ecot]="" [ecot-lite-dropout]="--set recipe_options.per_batch=true" [vla]="")

# phase SUFFIX ARGS...: one run per recipe into $work/<recipe>SUFFIX, side by side; ARGS may name
# {r} for the recipe. Fails if any run fails.
phase() {
    local suffix="$1"; shift
    local pids=() r resume
    for r in ecot ecot-lite-dropout vla; do
        resume=""; [ -f "$work/$r$suffix/train_config.json" ] && resume="--resume"
        # shellcheck disable=SC2086
        edge-vla train --recipe "$r" --out "$work/$r$suffix" "${common[@]}" ${extra[$r]} "${@//\{r\}/$r}" $resume &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
}
phase "" --set steps=1500 --set save_every=250
# Second phase, 600 more steps each from the first phase's final checkpoint (same budget for all):
# vla and ecot-lite-dropout switch to parallel action decoding (the chunk in one decoder pass),
# ecot, the baseline, goes on decoding as published (one action token at a time).
extra[ecot]+=" --set model.parallel_actions=false"
extra[ecot-lite-dropout]+=" --set model.parallel_actions=true"
extra[vla]+=" --set model.parallel_actions=true"
phase "-tuned" --set steps=600 --set save_every=100 --set "init_from=$work/{r}/final"
for r in ecot ecot-lite-dropout vla; do  # ship: the final checkpoint and both runs' summaries
    rm -rf "${here:?}/$r" && mkdir -p "$here/$r"
    cp -r "$work/$r-tuned/final/." "$here/$r/"
    cp "$work/$r-tuned/summary.json" "$here/$r/train_summary.json"
    cp "$work/$r/summary.json" "$here/$r/base_train_summary.json"
done
echo "checkpoints in $here"
