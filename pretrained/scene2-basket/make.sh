#!/usr/bin/env bash
# Rebuild the five-task checkpoints of LIVING_ROOM_SCENE2 (`make pretrained PRETRAINED=pretrained/scene2-basket`).
# Resumable at every step: data generation skips finished demos, every training run continues from
# its last saved state (--resume), a finished run (OUT/final) is skipped. Each checkpoint ships
# (float16) as soon as its run finishes, so `evaluate.sh` can roll it out while the rest train. Runs go to
# runs/scene2-basket/ (WORK= to move them), JOBS (default 2) of them side by side, one thread each.
#
# The comparison of issue #23: six recipes at one budget (10,000 steps x batch 16 = 160k samples,
# ~3 passes over the ~53k training samples of 58,670 demo steps), every one decoding its 4-action chunk in one decoder pass
# (`model.parallel_actions=true`), the full-CoT `ecot` included after its reasoning: that `ecot` is
# the fair baseline. The published `ecot` (one action token at a time) trains last, beside it.
# Then two students: the fair `ecot` distilled into a direct-mode student (its own reasoning written
# through the deployed decoder), and a two-layer student of `ecot-lite-dropout` (size distillation).
# Last, one control: `vla` for 5,000 steps on its own schedule, as many action steps as
# `ecot-lite-pretrain`'s second stage, to tell the pre-training's effect from the halved action budget's.
# And one variant outside the equal budget: `ecot-lite-dropout` continued from its shipped checkpoint
# for another 10,000 steps (twice the budget), to measure how much of the bar's gap is training budget.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${WORK:-$here/../../runs/scene2-basket}"
# Where the checkpoints ship (SHIP=): this directory, or another checkout's when the runs were
# started from a separate worktree so that edits here cannot change a run under way.
ship="${SHIP:-$here}"
jobs="${JOBS:-2}"
# MISSING_ONLY=1: train only what is not shipped here yet (a run whose state was lost with its
# machine is then finished on another); a student's teacher is then the shipped checkpoint when its
# run is not in $work. Without it every run is rebuilt (resumed where its state is in $work).
missing_only="${MISSING_ONLY:-0}"
export OMP_NUM_THREADS=1
mkdir -p "$work"

edge-vla data generate --out "$work/data" --tasks living-room-scene2-basket \
    --demos-per-task 100 --image-size 64 --seed 0 --workers "$jobs" --no-progress

# What the demo checks before comparing them (its tasks, its action chunk, the data seed it must avoid),
# written first: `make demo` takes this set as soon as vla, ecot and ecot-lite-dropout are shipped.
python - "$ship/pretrained.json" <<'PY'
import json, sys
from edge_vla.io import atomic_write_text
from edge_vla.sim.env import TASK_SETS
atomic_write_text(sys.argv[1], json.dumps({
    "description": "tiny preset, LIBERO-90 LIVING_ROOM_SCENE2's five basket tasks, 100 scripted-expert demos each "
                   "(random layouts, seed 0); 10,000 steps x batch 16 per recipe (160k samples), parallel action "
                   "decoding (ecot-sequential: one token at a time); two distilled students",
    "suite": "libero_90", "tasks": list(TASK_SETS["libero_90"]["living-room-scene2-basket"]),
    "action_chunk": 4, "image_size": 64, "cameras": ["agentview", "wrist"],
    "data_command": "edge-vla data generate --tasks living-room-scene2-basket --demos-per-task 100 --image-size 64 --seed 0",
    "data_seed": 0,
    "recipes": ["vla", "ecot", "ecot-lite-dropout", "ecot-lite-pretrain", "scaffold", "thinking-tokens"],
    "students": {"ecot-distilled": "ecot (reasoning distillation)", "dropout-2layer": "ecot-lite-dropout (2 LM layers)"},
    "controls": {"vla-5000": "vla, 5,000 steps on its own schedule (ecot-lite-pretrain's action steps)"},
    "variants": {"ecot-sequential": "ecot as published: its action chunk one token at a time after the reasoning",
                 "ecot-lite-dropout-20000": "ecot-lite-dropout continued from its shipped checkpoint for 10,000 more "
                                            "steps (twice the budget: 320k samples)"},
    "baseline": "ecot",
    # `make demo` over this set: 8 new demos per task (seed 1) for its live proof runs and
    # held-out observations, 4 rollouts per task (20 per recipe) to stay within ~45 minutes.
    "demo": {"tasks": list(TASK_SETS["libero_90"]["living-room-scene2-basket"]), "demos_per_task": 8, "trials": 4},
}, indent=1) + "\n")
PY

budget=(--set steps=10000 --set save_every=500 --set eval_every=2000)
common=(--data "$work/data" --set action_chunk=4 --set lr=1e-3 --set warmup_steps=50 "${budget[@]}" --no-progress)

# ship_one NAME: the finished run's checkpoint in float16 (half the bytes) with its run's summary,
# shipped as soon as it is done so that `evaluate.sh` can roll it out while the others train.
ship_one() {
    local r="$1"
    [ -f "$ship/$r/train_summary.json" ] && cmp -s "$work/$r/summary.json" "$ship/$r/train_summary.json" && return 0
    local tmp="$ship/.$r.tmp"
    rm -rf "$tmp"
    python -c 'import sys, torch; from edge_vla.model.vla import VLA
VLA.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], dtype=torch.float16)' "$work/$r/final" "$tmp"
    cp "$work/$r/summary.json" "$tmp/train_summary.json"
    rm -rf "${ship:?}/$r" && mv "$tmp" "$ship/$r"
}

# shipped_only NAME: true when MISSING_ONLY=1 and NAME is shipped but its run is not in $work to resume.
shipped_only() { [ "$missing_only" = 1 ] && [ -f "$ship/$1/train_summary.json" ] && [ ! -d "$work/$1/final" ]; }

# train NAME RECIPE ARGS...: one run into $work/NAME (log: $work/NAME.log), resumed if begun.
train() {
    local name="$1" recipe="$2"; shift 2
    shipped_only "$name" && { echo "$name: shipped, kept (MISSING_ONLY=1)"; return 0; }
    [ -d "$work/$name/final" ] && { ship_one "$name"; return 0; }
    local resume=""; [ -f "$work/$name/train_config.json" ] && resume="--resume"
    edge-vla train --recipe "$recipe" --out "$work/$name" "${common[@]}" "$@" $resume >>"$work/$name.log" 2>&1 ||
        { echo "$name failed: see $work/$name.log"; return 1; }
    ship_one "$name"
}

# distil NAME TEACHER ARGS...: one distillation run into $work/NAME, resumed if begun.
distil() {
    local name="$1" teacher="$2"; shift 2
    shipped_only "$name" && { echo "$name: shipped, kept (MISSING_ONLY=1)"; return 0; }
    [ -d "$work/$name/final" ] && { ship_one "$name"; return 0; }
    local resume=""; [ -f "$work/$name/distill_config.json" ] && resume="--resume"
    local from="$work/$teacher/final"
    shipped_only "$teacher" && from="$ship/$teacher"
    edge-vla distill --teacher "$from" --data "$work/data" --out "$work/$name" "$@" \
        --set save_every=250 --no-progress $resume >>"$work/$name.log" 2>&1 ||
        { echo "$name failed: see $work/$name.log"; return 1; }
    ship_one "$name"
}

# Up to $jobs commands at once, in order; stops at the first failure once the running ones end.
declare -A pid_of
slot() {
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || { wait; exit 1; }; done
    "$@" & pid_of[$2]=$!
}
# after NAME...: block until those runs have ended (the others keep their slots) and each has a
# checkpoint to teach from; a student starts as soon as its teacher is done, not after every run.
after() {
    local n
    for n in "$@"; do
        while [ -n "${pid_of[$n]:-}" ] && kill -0 "${pid_of[$n]}" 2>/dev/null; do sleep 20; done
        finished "$n" || { wait; exit 1; }
    done
}
finished() { [ -d "$work/$1/final" ] || shipped_only "$1" || { echo "$1 did not finish: see $work/$1.log"; return 1; }; }

parallel=(--set model.parallel_actions=true)
# The pair the issue's bar compares first, then the rest (cheapest first).
slot train ecot-lite-dropout ecot-lite-dropout "${parallel[@]}"
slot train ecot ecot "${parallel[@]}"
slot train vla vla "${parallel[@]}"
slot train thinking-tokens thinking-tokens "${parallel[@]}"
slot train ecot-lite-pretrain ecot-lite-pretrain "${parallel[@]}"
slot train scaffold scaffold "${parallel[@]}"
# Students, at the same budget of student steps each; the reasoning teacher writes its chain of
# thought for a seeded 4,000-sample subset (~0.7-0.8 s of one core each on this model: ~50 min).
after ecot
slot distil ecot-distilled ecot --mode reasoning --set steps=3000 --set teacher_samples=4000
after ecot-lite-dropout
slot distil dropout-2layer ecot-lite-dropout --mode size --student lm.num_hidden_layers=2 --set steps=3000
# The control before the sequential baseline: it costs half as much.
slot train vla-5000 vla "${parallel[@]}" --set steps=5000
slot train ecot-sequential ecot --set model.parallel_actions=false
# Twice the budget: from the shipped float16 checkpoint (what anyone who clones this set has), its own
# warm-up and cosine from half the learning rate, another data order (seed 1; the seed also picks the
# validation episodes, so this run's validation figures overlap the first run's training episodes).
after ecot-lite-dropout
slot train ecot-lite-dropout-20000 ecot-lite-dropout --set init_from="$ship/ecot-lite-dropout" --set lr=5e-4 \
    --set eval_every=2500 --set seed=1
wait
for n in "${!pid_of[@]}"; do finished "$n" || exit 1; done

echo "checkpoints in $ship"
