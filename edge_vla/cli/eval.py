import click

# ACT's temporal ensembling (edge_vla.eval.chunking), the same option for simulated and real rollouts.
temporal_ensemble_option = click.option(
    "--temporal-ensemble", default=None, type=float, metavar="M",
    help="ACT temporal ensembling: query every step, act on the exp(-M*i)-weighted mean of every chunk's "
         "prediction for it (ACT uses M=0.01).")


@click.group("eval")
def eval_group():
    """Evaluate policies: LIBERO rollouts, hardware rollouts through the policy server, or offline on held-out data."""


@eval_group.command("libero")
@click.argument("policies", nargs=-1, required=True)
@click.option("--suite", default="libero_90", show_default=True, help="LIBERO suite.")
@click.option("--tasks", default=None,
              help="Comma-separated task names, indices or task sets, e.g. living-room-scene2-basket "
                   "(its five basket tasks; default: every task of the suite).")
@click.option("--trials", default=50, show_default=True, type=int, help="Benchmark init states per task.")
@click.option("--first-trial", default=0, show_default=True, type=int, help="First benchmark init state.")
@click.option("--workers", default=None, type=int,
              help="Parallel rollout processes on this machine (default 1), or Ray actors with --ray "
                   "(default: one per CPU of the cluster).")
@click.option("--shard", default="0/1", show_default=True, help="Run shard i of N (i/N) of the episode list.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Run the episodes on a Ray cluster: `local` starts one here for the run, `auto` joins the one "
                   "running here, or HOST:PORT / ray://HOST:PORT (needs `pip install 'edge-vla[ray]'`).")
@click.option("--perturbation", default=None, metavar="NAME",
              help="LIBERO-PRO: roll out on the perturbed version of --suite (e.g. swap, lan, object, task, "
                   "with_mug); an unknown name lists the ones the installed package carries.")
@click.option("--out", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="Results directory (one JSON per policy; re-running resumes).")
@click.option("--video", "video_dir", default=None, type=click.Path(file_okay=False),
              help="Write an mp4 per episode (reasoning drawn on the frames) under this directory.")
@click.option("--reason-every", default=1, show_default=True, type=int,
              help="Full mode: reason every k-th call, reuse the last reasoning in between.")
@click.option("--execute-k", default=None, type=int, help="Actions of a chunk executed before re-planning (default: all).")
@temporal_ensemble_option
@click.option("--backend", default="auto", show_default=True)
@click.option("--mode", default=None,
              help="full | direct | adaptive, or several comma-separated (each its own results file; "
                   "default: the recipe's).")
@click.option("--entropy-threshold", default=None, type=float,
              help="Adaptive mode: reason when the direct action tokens' mean entropy is above this (default 1.0).")
@click.option("--max-free-tokens", default=None, type=int, help="Full/adaptive mode: most reasoning tokens per call.")
@click.option("--max-steps", default=None, type=int, help="Override the suite's step limit.")
@click.option("--name", default=None, help="Variant name in the results (one policy and mode only).")
@click.option("--no-progress", is_flag=True, help="No progress bar (batch jobs).")
def libero(policies, suite, tasks, trials, first_trial, workers, shard, ray_address, perturbation, out, video_dir,
           reason_every, execute_k, temporal_ensemble, backend, mode, entropy_threshold, max_free_tokens, max_steps, name,
           no_progress):
    """Roll POLICIES (checkpoints, bundles, or `expert` for the scripted ceiling check) out in LIBERO
    with the field's protocol (seed 7, 10 settle steps, per-suite step limits, benchmark init states)."""
    from edge_vla.errors import EdgeVLAError
    from edge_vla.eval.libero_rollout import RolloutConfig, parse_shard, run_libero

    modes = [m.strip() for m in mode.split(",") if m.strip()] if mode else [None]
    if name and len(policies) * len(modes) > 1:
        raise EdgeVLAError("--name names one variant, but several policies or modes were given", "drop --name")
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    for policy in policies:
        for m in modes:
            cfg = RolloutConfig(policy=policy, suite=suite, tasks=task_list, trials=trials, first_trial=first_trial,
                                out=out, name=name, backend=backend, mode=m, workers=workers,
                                shard=parse_shard(shard), execute_k=execute_k, temporal_ensemble=temporal_ensemble,
                                reason_every=reason_every, max_steps=max_steps, video_dir=video_dir,
                                perturbation=perturbation, ray=ray_address, entropy_threshold=entropy_threshold,
                                max_free_tokens=max_free_tokens)
            r = run_libero(cfg, progress=not no_progress)
            _print_summary(f"{policy}" + (f" ({m})" if m else ""), r)


def _print_summary(label: str, r: dict) -> None:
    """Pooled success with its Wilson interval, why episodes failed, how often it reasoned, and a
    line per task when there are several."""
    s = r["summary"]

    def rate(k, n, ci):
        return f"{k}/{n} ({100 * k / n:.1f}% [{100 * ci[0]:.0f}-{100 * ci[1]:.0f}])" if n else "0/0"

    click.echo(f"{label}: success {rate(s['successes'], s['episodes'], s['success_ci95'])}, ran {r['ran']}, "
               f"resumed past {r['skipped']} -> {r['path']}")
    o = s.get("outcomes") or {}
    if s.get("outcome_episodes"):
        click.echo("  failures: " + ", ".join(f"{k.replace('_', ' ')} {o.get(k, 0)}"
                                              for k in ("wrong_object", "placement_failure", "grasp_failure")))
    mode = str((r.get("variant") or {}).get("mode") or "")
    if mode not in ("direct", "expert") and s.get("reasoning_rate") is not None and s.get("latency_by_path"):
        lp = s["latency_by_path"]
        fmt = lambda x: "-" if x is None else f"{x:.1f} ms"  # noqa: E731
        click.echo(f"  reasoned on {100 * s['reasoning_rate']:.0f}% of {s['calls']} calls; p50 "
                   f"{fmt(lp['reasoned']['p50_ms'])} reasoning, {fmt(lp['direct']['p50_ms'])} direct")
    per_task = s.get("per_task") or {}
    if len(per_task) > 1:
        for task, t in per_task.items():
            click.echo(f"  {task}: {rate(t['successes'], t['episodes'], t['success_ci95'])}")


@eval_group.command("hardware")
@click.argument("policy")
@click.option("--robot", required=True,
              help="libero:SUITE/TASK[@INIT] (simulated robot) or module:Class (your robot, see edge_vla.eval.hardware).")
@click.option("--episodes", default=1, show_default=True, type=int)
@click.option("--max-steps", default=400, show_default=True, type=int)
@click.option("--execute-k", default=None, type=int, help="Actions of a chunk executed before re-planning.")
@temporal_ensemble_option
@click.option("--success", type=click.Choice(["ask", "yes", "no", "auto"]), default="ask", show_default=True,
              help="ask the operator after each episode, a fixed answer, or auto (the simulator judges).")
@click.option("--out", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--record-dir", default=None, type=click.Path(file_okay=False), help="hdf5 per episode (default OUT/episodes).")
@click.option("--api-key", envvar="EDGE_VLA_API_KEY", default=None, help="Server API key (env EDGE_VLA_API_KEY).")
@click.option("--timeout", default=30.0, show_default=True, type=float, help="Seconds to wait for each server reply.")
@click.option("--control-hz", default=None, type=float, help="Pace the loop at the robot's control rate.")
@click.option("--backend", default="auto", show_default=True, help="In-process policy backend.")
@click.option("--mode", default=None, help="In-process decode mode.")
@click.option("--name", default=None, help="Variant name in the results.")
def hardware(policy, robot, episodes, max_steps, execute_k, temporal_ensemble, success, out, record_dir, api_key, timeout,
             control_hz, backend, mode, name):
    """Robot-side rollouts: POLICY is a server (ws://HOST:PORT, from `edge-vla serve`) or a local
    checkpoint/bundle. Records every episode to hdf5 and writes a results file."""
    from edge_vla.eval.hardware import HardwareConfig, run_hardware

    cfg = HardwareConfig(policy=policy, robot=robot, episodes=episodes, max_steps=max_steps, execute_k=execute_k,
                         temporal_ensemble=temporal_ensemble, success=success, out=out, record_dir=record_dir, name=name,
                         api_key=api_key, backend=backend, mode=mode, timeout_s=timeout, control_hz=control_hz)
    r = run_hardware(cfg)
    s = r["summary"]
    click.echo(f"success {s['successes']}/{s['episodes']}; {len(r['episodes'])} episode(s) recorded; results -> {r['path']}")


@eval_group.command("offline")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True),
              help="The dataset it was trained on (its held-out validation split is used) or another one.")
@click.option("--samples", default=64, show_default=True, type=int, help="Validation samples, spread evenly.")
@click.option("--mode", default=None, type=click.Choice(["full", "direct", "adaptive"]),
              help="Decode mode (default: the recipe's).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write the metrics to this JSON file.")
def offline(checkpoint, data, samples, mode, out):
    """Validation metrics of CHECKPOINT on held-out samples, decoded as the deployed policy decodes:
    action accuracy free-running and teacher-forced, and for a reasoning policy how close its own
    reasoning is to the annotation, field by field, with the action accuracy when its MOVE is right
    vs wrong (see edge_vla/train/evaluate.py)."""
    import json

    from edge_vla.io import atomic_write_text
    from edge_vla.train.evaluate import evaluate_checkpoint

    if samples < 1:
        raise click.BadParameter("must be at least 1", param_hint="--samples")
    r = evaluate_checkpoint(checkpoint, data, samples, mode)
    click.echo(f"{r['recipe']} ({r['mode']} mode), {r['metrics']['n']} held-out samples of {data}:")
    for k, v in r["metrics"].items():
        click.echo(f"  {k:30s} {v:.4f}" if isinstance(v, float) else f"  {k:30s} {v}")
    if out:
        atomic_write_text(out, json.dumps(r, indent=1) + "\n")
        click.echo(f"wrote {out}")
