#!/usr/bin/env bash
# The five-task comparison's evaluation (issue #23): every shipped checkpoint here rolled out on the
# first TRIALS (default 20) benchmark init states of each of LIVING_ROOM_SCENE2's five basket tasks
# (held out: the training demos use random layouts), LIBERO's protocol (seed 7, 10 settle steps,
# 400 steps per episode), then one trade-off report. Resumable: a bundle already exported is kept,
# a results file keeps every finished episode and a rerun runs only the rest. Bundles, results and
# report go to runs/scene2-basket/ (bundles/, eval/).
#
# What rolls out is each checkpoint's fp32 ONNX bundle (`edge-vla export --fp32`: parity-checked
# against PyTorch, the same greedy decisions), so the latency per call is the deployed CPU
# runtime's, not PyTorch eager's, and a full-mode call (~270 reasoning tokens) costs ~0.08 s of
# one core instead of ~0.7 s. Cost on this 2-core CPU: ~21 s of one core per failed direct-mode
# episode (400 steps; frames are rendered only before a policy call), ~30 s in full mode.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${WORK:-$here/../../runs/scene2-basket}"
ship="${SHIP:-$here}"  # where the checkpoints are (make.sh's SHIP)
mkdir -p "$work/bundles"
# The physical path: a results file resumes only for the same policy path, whichever symlink led here.
work="$(cd "$work" && pwd -P)"
out="$work/eval"
bundles="$work/bundles"
export OMP_NUM_THREADS=1
eval_args=(--tasks living-room-scene2-basket --trials "${TRIALS:-20}" --workers "${JOBS:-2}" --out "$out" --no-progress)

# bundle NAME: the shipped checkpoint NAME as an fp32 bundle named like it (the report's variant
# names come from it: ecot -> ecot-full). An existing bundle is reused while the checkpoint it was
# exported from is still the one shipped (NAME.shipped.json: its training summary); a re-shipped
# checkpoint is exported again, and its old results file is then refused by `eval libero`.
# The export checks parity on the training data's held-out samples where make.sh's demos are here
# (a machine that has only the shipped checkpoints checks it on synthetic inputs).
data_args=(); [ -f "$work/data/manifest.json" ] && data_args=(--data "$work/data")
bundle() {
    local stamp="$bundles/$1.shipped.json"
    if [ -d "$bundles/$1" ] && { [ ! -f "$stamp" ] || cmp -s "$ship/$1/train_summary.json" "$stamp"; }; then return 0; fi
    edge-vla export "$ship/$1" -o "$bundles/$1" --fp32 "${data_args[@]}" >>"$bundles/export.log" 2>&1 ||
        { echo "export of $1 failed: see $bundles/export.log"; return 1; }
    cp "$ship/$1/train_summary.json" "$stamp"
}

# The comparison's pair first: the dropout model in direct and adaptive mode, the fair full-CoT
# baseline in its own (full) mode. Then the others in their recipe's mode, and last the dropout
# model's full mode (the slowest rollouts: ~60 s of a core per episode, which would otherwise hold
# back every recipe shipped after it). What is not shipped yet (make.sh ships each run as it
# finishes) is left for the next run.
for r in ecot-lite-dropout ecot vla ecot-lite-pretrain scaffold thinking-tokens ecot-distilled dropout-2layer ecot-sequential vla-5000 \
         ecot-lite-dropout-20000; do
    [ -f "$ship/$r/train_summary.json" ] || { echo "$r: not shipped yet, skipped"; continue; }
    bundle "$r"
    modes=(); [ "$r" = ecot-lite-dropout ] && modes=(--mode direct,adaptive)
    edge-vla eval libero "$bundles/$r" "${modes[@]}" "${eval_args[@]}"
done
if [ -f "$ship/ecot-lite-dropout/train_summary.json" ]; then
    edge-vla eval libero "$bundles/ecot-lite-dropout" --mode full "${eval_args[@]}"
fi
# The fair full-CoT model (parallel action chunk after its reasoning) is the baseline, not the
# published sequential one.
edge-vla report "$out" -o "$out/report" --baseline ecot-full
