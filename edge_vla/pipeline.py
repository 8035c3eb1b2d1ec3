"""The main job (`edge-vla demo`, `make demo`): the whole toolkit end to end on one CPU.

    LIBERO demos with reasoning  ->  train vla / ecot / ecot-lite-dropout (same budget)
    -> export fp32 / int8 / int4 bundles  ->  bench side by side  ->  LIBERO rollouts on
    held-out init states  ->  trade-off report (Markdown + HTML + Pareto plot)

Every stage writes its output atomically and is skipped when a previous run finished it, so an
interrupted demo resumes where it stopped. This module only orchestrates: each stage is the
same public function the matching CLI command calls.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_vla.errors import EdgeVLAError
from edge_vla.artifacts import content_digest
from edge_vla.io import atomic_write_text, read_json
from edge_vla.sim.env import HELD_OUT_INIT_STATES_FROM

# The task of the demo: a LIBERO-90 basket task the scripted expert solves reliably. One task:
# on a 2-core CPU the training budget of one task is what a policy can learn (README, "demo").
DEMO_TASKS = ("LIVING_ROOM_SCENE2_pick_up_the_butter_and_put_it_in_the_basket",)
# What a directory of shipped checkpoints says about itself (tasks, chunking) in this file.
PRETRAINED_INFO = "pretrained.json"
BASELINE_RECIPE = "ecot"
# What a shipped set's pretrained.json may set of its own demo (DemoConfig.for_pretrained).
PRETRAINED_DEMO_KEYS = ("tasks", "demos_per_task", "trials", "max_steps")


@dataclass
class DemoConfig:
    out: str = "demo_out"
    suite: str = "libero_90"
    tasks: tuple[str, ...] = DEMO_TASKS
    demos_per_task: int = 40
    image_size: int = 64
    # The shipped checkpoints were trained on seed 0's demos (pretrained.json): the demo's own,
    # seed 1, are new layouts for them, so its "held-out" observations are held out for every model.
    data_seed: int = 1
    workers: int = 2
    recipes: tuple[str, ...] = ("vla", "ecot", "ecot-lite-dropout")
    # The fast policies decode their action chunk in one pass (VLAConfig.parallel_actions); `ecot`,
    # the baseline, decodes as published: reasoning, then one action token at a time.
    parallel_recipes: tuple[str, ...] = ("vla", "ecot-lite-dropout")
    # per_batch: a micro-batch is all-short or all-long, not padded to the reasoning length throughout.
    recipe_options: dict = field(default_factory=lambda: {"ecot-lite-dropout": {"per_batch": True}})
    train_steps: int = 300
    proof_steps: int = 100  # live steps per recipe when shipped checkpoints are what is compared
    batch_size: int = 16
    lr: float = 1e-3
    action_chunk: int = 4
    execute_k: int = 4
    precisions: tuple[str, ...] = ("fp32", "int8", "int4")
    rollout_precision: str = "int8"
    trials: int = 10
    first_trial: int = HELD_OUT_INIT_STATES_FROM  # never used to make training demos
    max_steps: int | None = 300
    bench_calls: int = 20
    val_samples: int = 32  # validation samples decoded at the end of training (full mode decodes reasoning)
    pretrained: str | None = None  # directory of shipped checkpoints (<recipe>/) used for the comparison
    data: str | None = None  # an existing dataset (edge-vla data generate) instead of generating one
    model: dict = field(default_factory=dict)

    @classmethod
    def for_pretrained(cls, pretrained: str, quick: bool = False, **kw) -> "DemoConfig":
        """The demo over a shipped set: its pretrained.json may say how its demo runs (`demo`: the
        tasks, demos per task, trials per task, step limit) so that a multi-task set fits the
        demo's time; what the user gives (`kw`) wins. The quick demo keeps its own small settings."""
        if quick:
            return cls.quick(**kw, pretrained=pretrained)
        how = f"fix `demo` in {Path(pretrained) / PRETRAINED_INFO} (keys: {', '.join(PRETRAINED_DEMO_KEYS)})"
        info_file = Path(pretrained) / PRETRAINED_INFO
        own = (read_json(info_file, how).get("demo") or {}) if info_file.is_file() else {}
        if not isinstance(own, dict):
            raise EdgeVLAError(f"`demo` in {info_file} is not a mapping", how)
        unknown = sorted(set(own) - set(PRETRAINED_DEMO_KEYS))
        if unknown:
            raise EdgeVLAError(f"{info_file}: `demo` has unknown key(s) {unknown}", how)
        if "tasks" in own:
            own["tasks"] = tuple(own["tasks"])
        return cls(**{**own, **kw, "pretrained": pretrained})

    @classmethod
    def quick(cls, **kw) -> "DemoConfig":
        base = dict(tasks=DEMO_TASKS[:1], demos_per_task=3, train_steps=30, proof_steps=30, trials=2, bench_calls=5, val_samples=4,
                    max_steps=120, precisions=("fp32", "int8", "int4"))
        base.update(kw)
        return cls(**base)


class Stage:
    """A named step whose completion is recorded in `<out>/stages.json` (so reruns skip it)."""

    def __init__(self, root: Path):
        self.root = root
        self.file = root / "stages.json"
        self.done = read_json(self.file, f"delete {self.file} to rerun every stage") if self.file.exists() else {}

    def finished(self, name: str) -> bool:
        return name in self.done

    def record(self, name: str, info: dict) -> None:
        self.done[name] = {**info, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_text(self.file, json.dumps(self.done, indent=2))


def with_task_names(cfg: DemoConfig) -> DemoConfig:
    """`cfg` with its tasks as the suite's task names: a task set (living-room-scene2-basket), an
    index or an instruction names the same tasks as in `edge-vla data generate` and `eval libero`."""
    from edge_vla.sim.env import expand_tasks

    return dataclasses.replace(cfg, tasks=tuple(expand_tasks(cfg.suite, cfg.tasks)))


def run_demo(cfg: DemoConfig, console=None) -> dict:
    from rich.console import Console

    console = console or Console()
    cfg = with_task_names(cfg)
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "demo_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    stages = Stage(root)
    t0 = time.time()
    timings: dict[str, float] = {}

    def timed(name, fn):
        t = time.time()
        out = fn()
        timings[name] = timings.get(name, 0.0) + time.time() - t
        return out

    console.rule("[bold]1/6 demonstrations with reasoning (LIBERO, scripted expert + annotator)")
    data = timed("data", lambda: stage_data(cfg, root, stages))
    console.rule("[bold]2/6 training " + ", ".join(cfg.recipes))
    ckpts, models = timed("train", lambda: stage_train(cfg, root, data, stages))
    console.rule("[bold]3/6 export " + ", ".join(cfg.precisions))
    bundles = timed("export", lambda: stage_export(cfg, root, ckpts, data, stages))
    console.rule("[bold]4/6 benchmark side by side")
    bench = timed("bench", lambda: stage_bench(cfg, root, bundles, data, stages))
    console.rule("[bold]5/6 LIBERO rollouts on held-out init states")
    rollouts = timed("rollouts", lambda: stage_rollouts(cfg, root, bundles, stages))
    console.rule("[bold]6/6 report")
    report = timed("report", lambda: stage_report(cfg, root, [*rollouts, *bench], models))
    summary = {"report": report, "bundles": {k: str(v) for k, v in bundles.items()}, "seconds": time.time() - t0,
               "stage_seconds": timings, "checkpoints": {k: str(v) for k, v in ckpts.items()}}
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=2, default=str))
    print_summary(console, root, rollouts, report, summary)
    return summary


# --- stages ------------------------------------------------------------------------------------------
def stage_data(cfg: DemoConfig, root: Path, stages: Stage) -> Path:
    from edge_vla.data.generate import generate_dataset

    if cfg.data:
        from edge_vla.data.dataset import open_dataset

        open_dataset(cfg.data, split="all")  # fail now, with the dataset's own error, not mid-training
        return Path(cfg.data)
    out = root / "data"
    key = f"data:{len(cfg.tasks)}x{cfg.demos_per_task}@{cfg.image_size}:seed{cfg.data_seed}"
    if not stages.finished(key):
        generate_dataset(out, suite=cfg.suite, tasks=list(cfg.tasks), demos_per_task=cfg.demos_per_task,
                         image_size=cfg.image_size, workers=cfg.workers, seed=cfg.data_seed)
        stages.record(key, {"path": str(out)})
    return out


def live_steps(cfg: DemoConfig) -> int:
    return cfg.proof_steps if cfg.pretrained else cfg.train_steps


def train_config_for(cfg: DemoConfig, recipe: str):
    from edge_vla.train.config import TrainConfig

    steps = live_steps(cfg)
    model = {**cfg.model, **({"parallel_actions": True} if recipe in cfg.parallel_recipes else {})}
    return TrainConfig(recipe=recipe, recipe_options=dict(cfg.recipe_options.get(recipe, {})), preset="tiny",
                       steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=max(1, steps // 20),
                       action_chunk=cfg.action_chunk, model=model, eval_every=0, save_every=max(50, steps // 4),
                       val_max_samples=cfg.val_samples)


def stage_train(cfg: DemoConfig, root: Path, data: Path, stages: Stage) -> tuple[dict[str, Path], list[dict]]:
    """Train every recipe live with the same budget. With `pretrained`, the comparison uses the
    shipped checkpoints and the live runs only prove the stage (the report says which is which).
    Returns the compared checkpoints and where every model came from."""
    from edge_vla.train.trainer import train

    shipped = Path(cfg.pretrained) if cfg.pretrained else None
    if shipped:  # before hours of training, not after
        check_pretrained(shipped, cfg)
    ckpts: dict[str, Path] = {}
    models: list[dict] = []
    for recipe in cfg.recipes:
        out = root / "train" / recipe
        key = f"train:{recipe}:{live_steps(cfg)}" + (":parallel" if recipe in cfg.parallel_recipes else "")
        if not stages.finished(key):
            resume = (out / "train_config.json").exists()
            final = train(train_config_for(cfg, recipe), str(data), out, resume=resume)
            stages.record(key, {"checkpoint": str(final)})
        ckpts[recipe] = Path(stages.done[key]["checkpoint"])
        models.append(model_provenance(recipe, ckpts[recipe], "live", compared=shipped is None))
    if shipped:
        for recipe in cfg.recipes:
            ckpts[recipe] = shipped / recipe
            models.append(model_provenance(recipe, ckpts[recipe], "shipped", compared=True))
    return ckpts, models


def check_pretrained(shipped: Path, cfg: DemoConfig) -> None:
    """Shipped checkpoints must exist for every recipe, be trained on the demo's tasks and chunk
    actions the way the demo executes them."""
    how = f"build them with `make pretrained` (see {shipped / 'README.md'}), or drop --pretrained"
    for recipe in cfg.recipes:
        if not (shipped / recipe / "config.json").exists():
            raise EdgeVLAError(f"no shipped checkpoint for recipe `{recipe}` in {shipped}", how)
    if not (shipped / PRETRAINED_INFO).is_file():
        raise EdgeVLAError(f"{shipped} has no {PRETRAINED_INFO} (the tasks and action chunk of its checkpoints)", how)
    info = read_json(shipped / PRETRAINED_INFO, how)
    missing = sorted(set(cfg.tasks) - set(info.get("tasks", [])))
    if missing:
        raise EdgeVLAError(f"the checkpoints in {shipped} were not trained on {', '.join(missing)}",
                           f"use --task with their tasks ({', '.join(info.get('tasks', []))}), or drop --pretrained")
    if info.get("action_chunk") != cfg.action_chunk:
        raise EdgeVLAError(f"the checkpoints in {shipped} predict chunks of {info.get('action_chunk')} actions, "
                           f"the demo is set to {cfg.action_chunk}", how)
    if cfg.data is None and info.get("data_seed") == cfg.data_seed:
        raise EdgeVLAError(f"the demo would generate the demos the checkpoints in {shipped} were trained on "
                           f"(seed {cfg.data_seed}), so its held-out observations would not be held out",
                           "give the demo another data seed than pretrained.json's data_seed")


def model_provenance(recipe: str, checkpoint: Path, source: str, compared: bool) -> dict:
    """What the report says about a model: its training summary (a live run keeps it beside
    `final/`, a shipped checkpoint carries it as `train_summary.json`)."""
    from edge_vla.artifacts.checkpoint import CONFIG_FILE, load_config, training_summary
    from edge_vla.train.recipes import get_recipe

    info = {"recipe": recipe, "source": source, "checkpoint": str(checkpoint), "compared": compared}
    if (checkpoint / CONFIG_FILE).exists():
        info["action_decoding"] = "parallel" if load_config(checkpoint).parallel_actions else "sequential"
    summary = training_summary(checkpoint)
    if summary is not None:
        val = dict(summary.get("final_val") or {})
        if not get_recipe(recipe).needs_reasoning:
            val.pop("reasoning_loss", None)  # scored on reasoning the recipe never trains: noise
        info.update(steps=summary.get("steps"), final_val=val, command=summary.get("command"),
                    init_from=(summary.get("config") or {}).get("init_from"))
        # a shipped fine-tune carries the runs it started from, earliest first (one run: a dict)
        base = checkpoint / "base_train_summary.json"
        if info["init_from"] and base.exists():
            earlier = read_json(base, "re-run `make pretrained`")
            info["base_steps"] = [s.get("steps") for s in (earlier if isinstance(earlier, list) else [earlier])]
    return info


def stage_export(cfg: DemoConfig, root: Path, ckpts: dict[str, Path], data: Path, stages: Stage) -> dict[str, Path]:
    from edge_vla.export import export_bundle

    held_out = None
    bundles: dict[str, Path] = {}
    for recipe, ckpt in ckpts.items():
        digest = content_digest(ckpt)[:16]  # in the key: re-shipped checkpoints at the same path re-export
        for precision in cfg.precisions:
            name = f"{recipe}-{precision}"
            out = root / "bundles" / name
            key = f"export:{name}:{ckpt}@{digest}"
            if not stages.finished(key):
                if held_out is None:
                    held_out = _held_out_samples(data, cfg)
                export_bundle(ckpt, out, precision=precision, calibration_data=held_out, parity_samples=held_out[:4])
                stages.record(key, {"bundle": str(out)})
            bundles[name] = out
    return bundles


def _held_out_samples(data: Path, cfg: DemoConfig, n: int = 24) -> list:
    from edge_vla.data.dataset import open_dataset, pick_evenly

    return pick_evenly(open_dataset(data, split="val", action_chunk=cfg.action_chunk), n)


def stage_bench(cfg: DemoConfig, root: Path, bundles: dict[str, Path], data: Path, stages: Stage) -> list[Path]:
    """Every bundle in its recipe's default mode, each in a fresh one-thread process, in one run, on
    the held-out observations of `data` (full-CoT reasoning on noise images runs shorter than on
    the task's scenes: 181-223 vs ~269 tokens measured)."""
    from edge_vla.eval.bench import bench_artifacts, format_table

    key = "bench:" + ",".join(f"{n}@{content_digest(bundles[n])[:16]}" for n in sorted(bundles))
    if not stages.finished(key):
        # The full-CoT baseline first: every ratio printed is against it.
        order = sorted(bundles, key=lambda n: (not n.startswith(BASELINE_RECIPE + "-"), n))
        result = bench_artifacts([str(bundles[n]) for n in order], calls=cfg.bench_calls, out_dir=root / "bench",
                                 targets=("orin-agx-64", "orin-nano-8"), data=data)
        print(format_table(result))
        stages.record(key, {"files": result["files"]})
    return [Path(f) for f in stages.done[key]["files"]]


def stage_rollouts(cfg: DemoConfig, root: Path, bundles: dict[str, Path], stages: Stage) -> list[Path]:
    from edge_vla.eval.libero_rollout import RolloutConfig, run_libero

    paths = []
    for recipe in cfg.recipes:
        name = f"{recipe}-{cfg.rollout_precision}"
        rc = RolloutConfig(policy=str(bundles[name]), suite=cfg.suite, tasks=list(cfg.tasks), trials=cfg.trials,
                           first_trial=cfg.first_trial, out=str(root / "runs"), name=name, workers=cfg.workers,
                           execute_k=cfg.execute_k, max_steps=cfg.max_steps)
        # resumes on its own (finished episodes are skipped); a re-exported bundle's old episodes are kept aside
        res = run_libero(rc, set_aside_stale=True)
        if res["set_aside"]:
            print(f"{name}: the bundle changed since its rollouts; they are kept as {res['set_aside'].name}")
        paths.append(Path(res["path"]))
    return paths


def stage_report(cfg: DemoConfig, root: Path, results: list[Path], models: list[dict] | None = None) -> dict:
    from edge_vla.eval.report import build_report

    return build_report([str(p) for p in results], root / "report", models=models)


def print_summary(console, root: Path, rollouts: list[Path], report: dict, summary: dict) -> None:
    from rich.table import Table

    from edge_vla.eval.results import load_results

    table = Table("variant", "success", "95% CI", "latency p50 (ms)", title="edge-vla demo")
    for p in rollouts:
        r = load_results(p)
        s = r["summary"]
        ci = s.get("success_ci95") or (None, None)
        table.add_row(r["config"].get("name", p.stem), f"{s.get('success_rate', 0):.0%} ({s.get('successes', 0)}/{s.get('episodes', 0)})",
                      f"{ci[0]:.0%}-{ci[1]:.0%}" if ci[0] is not None else "-",
                      f"{s.get('latency_p50_ms') or 0:.1f}")
    console.print(table)
    console.print(f"report: [bold]{Path(report['out']) / 'report.html'}[/]  ({summary['seconds'] / 60:.1f} min)")
