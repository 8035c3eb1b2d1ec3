#!/usr/bin/env bash
# The five-task comparison's evaluation (issue #23): every shipped checkpoint here rolled out on the
# first TRIALS (default 20) benchmark init states of each of LIVING_ROOM_SCENE2's five basket tasks
# (held out: the training demos use random layouts), LIBERO's protocol (seed 7, 10 settle steps,
# 400 steps per episode), then one trade-off report. Resumable: a results file keeps every finished
# episode and a rerun runs only the rest. Results and report go to runs/scene2-basket/eval/.
# Cost on this 2-core CPU: ~21 s of one core per failed direct-mode episode (400 steps; frames are
# rendered only before a policy call), less per success;
# full mode adds the chain of thought per call.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${WORK:-$here/../../runs/scene2-basket}"
out="$work/eval"
export OMP_NUM_THREADS=1
eval_args=(--tasks living-room-scene2-basket --trials "${TRIALS:-20}" --workers "${JOBS:-2}" --out "$out" --no-progress)

# The comparison's pair first: the dropout model in direct, full and adaptive mode, the fair
# full-CoT baseline in its own (full) mode. Then the others in their recipe's mode.
edge-vla eval libero "$here/ecot-lite-dropout" --mode direct,adaptive,full "${eval_args[@]}"
edge-vla eval libero "$here/ecot" "${eval_args[@]}"
for r in vla ecot-lite-pretrain scaffold thinking-tokens ecot-distilled dropout-2layer ecot-sequential; do
    [ -d "$here/$r" ] && edge-vla eval libero "$here/$r" "${eval_args[@]}"
done
# The fair full-CoT model (parallel action chunk after its reasoning) is the baseline, not the
# published sequential one.
edge-vla report "$out" -o "$out/report" --baseline ecot-full
