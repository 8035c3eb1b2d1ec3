"""The demo orchestrator's own checks (the whole demo runs in the slow test_demo.py)."""

import json
from pathlib import Path

import pytest

from edge_vla.errors import EdgeVLAError
from edge_vla.pipeline import DEMO_TASKS, PRETRAINED_INFO, DemoConfig, check_pretrained


def shipped_dir(tmp_path, recipes, info):
    for r in recipes:
        (tmp_path / r).mkdir()
        (tmp_path / r / "config.json").write_text("{}")
    if info is not None:
        (tmp_path / PRETRAINED_INFO).write_text(json.dumps(info))
    return tmp_path


def test_shipped_checkpoints_matching_the_demo_pass(tmp_path):
    cfg = DemoConfig()
    d = shipped_dir(tmp_path, cfg.recipes, {"tasks": list(DEMO_TASKS), "action_chunk": cfg.action_chunk})
    check_pretrained(d, cfg)


@pytest.mark.parametrize("case, message", [
    ("missing recipe", "no shipped checkpoint for recipe `ecot-lite-dropout`"),
    ("no info", "has no pretrained.json"),
    ("other task", "were not trained on LIVING_ROOM_SCENE2_pick_up_the_butter"),
    ("other chunk", "predict chunks of 8 actions, the demo is set to 4"),
    ("same demos", "would generate the demos the checkpoints .* were trained on"),
])
def test_shipped_checkpoints_that_do_not_match_are_refused_before_training(tmp_path, case, message):
    cfg = DemoConfig()
    recipes = [r for r in cfg.recipes if not (case == "missing recipe" and r == "ecot-lite-dropout")]
    info = {"tasks": ["KITCHEN_SCENE1_put_the_black_bowl_on_the_plate"] if case == "other task" else list(DEMO_TASKS),
            "action_chunk": 8 if case == "other chunk" else cfg.action_chunk,
            "data_seed": cfg.data_seed if case == "same demos" else cfg.data_seed + 1}
    d = shipped_dir(tmp_path, recipes, None if case == "no info" else info)
    with pytest.raises(EdgeVLAError, match=message):
        check_pretrained(d, cfg)


def test_benchmark_demos_never_use_the_init_states_the_demo_evaluates_on():
    from edge_vla.data.generate import demo_init_state
    from edge_vla.sim.env import HELD_OUT_INIT_STATES_FROM

    used = {demo_init_state(k, a, 100, 50) for k in range(100) for a in range(3)}
    assert used == set(range(HELD_OUT_INIT_STATES_FROM))  # every training state, none held out
    assert demo_init_state(3, 1, 10, 20) == 13  # a suite with fewer states cycles over what it has


def test_with_shipped_checkpoints_the_live_runs_are_short_proofs():
    from edge_vla.pipeline import live_steps, train_config_for

    assert live_steps(DemoConfig()) == 300
    cfg = DemoConfig(pretrained="pretrained/x")
    assert live_steps(cfg) == 100 and train_config_for(cfg, "ecot").steps == 100
    assert train_config_for(DemoConfig.quick(pretrained="p"), "vla").steps == 30
    # the fast policies decode their chunk in one pass; the ecot baseline as published
    assert train_config_for(cfg, "ecot-lite-dropout").model == {"parallel_actions": True}
    assert train_config_for(cfg, "ecot-lite-dropout").recipe_options == {"per_batch": True}
    assert train_config_for(cfg, "ecot").model == {} and train_config_for(cfg, "vla").model["parallel_actions"]


PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"
SHIPPED = PRETRAINED_DIR / "tiny-libero-butter"


@pytest.mark.parametrize("shipped", [SHIPPED, PRETRAINED_DIR / "scene2-basket"], ids=lambda p: p.name)
def test_the_shipped_checkpoints_load_and_match_their_description(shipped):
    """What `make demo` compares: every shipped checkpoint of a set loads as a policy, predicts
    chunks of the size pretrained.json claims, and records the command that trained it; the set's
    own demo settings pass the demo's checks (its tasks, chunk, a data seed of its own)."""
    import numpy as np

    from edge_vla.pipeline import with_task_names
    from edge_vla.runtime.policy import load_policy

    if not (shipped / "ecot" / "model.safetensors").exists():
        pytest.skip(f"{shipped.name}: the shipped checkpoints are missing (`make pretrained` rebuilds them)")
    info = json.loads((shipped / PRETRAINED_INFO).read_text())
    check_pretrained(shipped, DemoConfig(tasks=tuple(info["tasks"]), action_chunk=info["action_chunk"]))
    check_pretrained(shipped, with_task_names(DemoConfig.for_pretrained(str(shipped))))
    rng = np.random.default_rng(0)
    obs = {"images": {c: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for c in info["cameras"]},
           "instruction": "pick up the butter and put it in the basket", "state": np.zeros(8, np.float32)}
    # a control (vla-5000) or a variant (ecot-sequential): one of the set's recipes trained otherwise
    otherwise = {**info.get("controls", {}), **info.get("variants", {})}
    names = [r for r in [*info["recipes"], *info.get("students", {}), *otherwise] if (shipped / r).is_dir()]
    assert {"vla", "ecot", "ecot-lite-dropout"} <= set(names)  # what the demo compares
    for recipe in names:
        summary = json.loads((shipped / recipe / "train_summary.json").read_text())
        trained_as = recipe
        if recipe in otherwise:
            trained_as = summary["recipe"]["name"]
            assert trained_as in info["recipes"]
        assert summary["command"].startswith(f"edge-vla train --recipe {trained_as} ") or (
            recipe in info.get("students", {}) and summary["command"].startswith("edge-vla distill "))
        assert summary["steps"] > 0
        if recipe not in info.get("students", {}):  # a student acts with its teacher's chunk: checked by acting below
            assert summary["config"]["action_chunk"] == info["action_chunk"]
        policy = load_policy(shipped / recipe, backend="torch", mode="direct")
        assert policy.act(obs).action.shape == (info["action_chunk"], 7)


def test_content_digest_follows_what_a_checkpoint_or_bundle_holds(tmp_path):
    from edge_vla.artifacts import content_digest

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    first = content_digest(ckpt)
    assert content_digest(ckpt) == first
    (ckpt / "model.safetensors").write_bytes(b"weightz")
    assert content_digest(ckpt) != first
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "model.safetensors").rename(ckpt / "other.safetensors")  # same bytes, another file
    assert content_digest(ckpt) != first
    renamed = content_digest(ckpt)
    (ckpt / "train_summary.json").write_text("{}")  # provenance: the same model
    assert content_digest(ckpt) == renamed
    # a bundle is named by its manifest, which carries every file's sha256
    (ckpt / "manifest.json").write_text('{"files": {}}')
    bundle = content_digest(ckpt)
    (ckpt / "other.safetensors").write_bytes(b"changed without a new manifest: load_bundle refuses it")
    assert content_digest(ckpt) == bundle
    (ckpt / "manifest.json").write_text('{"files": {"a": "0"}}')
    assert content_digest(ckpt) != bundle


def test_the_demo_re_exports_a_checkpoint_whose_contents_changed(tmp_path, monkeypatch):
    """Re-shipped checkpoints (a pull, `make pretrained`) sit at the same path: the demo's
    recorded export of the old ones must not stand in for them."""
    import edge_vla.export
    from edge_vla import pipeline

    exported = []
    monkeypatch.setattr(edge_vla.export, "export_bundle", lambda ckpt, out, **kw: exported.append(kw["precision"]))
    monkeypatch.setattr(pipeline, "_held_out_samples", lambda data, cfg: [])
    ckpt = tmp_path / "ecot"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"old")
    cfg = DemoConfig(precisions=("int8",))
    stages = pipeline.Stage(tmp_path / "demo")
    for _ in range(2):
        pipeline.stage_export(cfg, tmp_path / "demo", {"ecot": ckpt}, tmp_path / "data", stages)
    assert exported == ["int8"]  # the second run reused the first
    (ckpt / "model.safetensors").write_bytes(b"new")
    pipeline.stage_export(cfg, tmp_path / "demo", {"ecot": ckpt}, tmp_path / "data", pipeline.Stage(tmp_path / "demo"))
    assert exported == ["int8", "int8"]


def test_demo_takes_task_sets_and_names_a_wrong_task():
    from edge_vla.pipeline import DemoConfig, with_task_names

    cfg = with_task_names(DemoConfig(tasks=("living-room-scene2-basket",)))
    assert len(cfg.tasks) == 5 and all(t.startswith("LIVING_ROOM_SCENE2_pick_up_the_") for t in cfg.tasks)
    assert DEMO_TASKS[0] in cfg.tasks
    assert with_task_names(DemoConfig()).tasks == tuple(DEMO_TASKS)
    with pytest.raises(EdgeVLAError, match="living-room-scene2-basket"):
        with_task_names(DemoConfig(tasks=("living-room-scene2-baskets",)))


def test_a_shipped_set_says_how_its_demo_runs_and_the_user_wins(tmp_path):
    five = ["LIVING_ROOM_SCENE2_pick_up_the_butter_and_put_it_in_the_basket",
            "LIVING_ROOM_SCENE2_pick_up_the_milk_and_put_it_in_the_basket"]
    d = shipped_dir(tmp_path, DemoConfig().recipes,
                    {"tasks": five, "action_chunk": 4, "demo": {"tasks": five, "trials": 4, "demos_per_task": 8}})
    cfg = DemoConfig.for_pretrained(str(d))
    assert (cfg.tasks, cfg.trials, cfg.demos_per_task, cfg.pretrained) == (tuple(five), 4, 8, str(d))
    check_pretrained(d, cfg)
    assert DemoConfig.for_pretrained(str(d), trials=2).trials == 2
    assert DemoConfig.for_pretrained(str(d), quick=True).tasks == DEMO_TASKS[:1]  # quick stays quick
    # A set without `demo` (the butter set) runs the default demo.
    (d / PRETRAINED_INFO).write_text(json.dumps({"tasks": list(DEMO_TASKS), "action_chunk": 4}))
    assert DemoConfig.for_pretrained(str(d)).trials == DemoConfig().trials
    (d / PRETRAINED_INFO).write_text(json.dumps({"tasks": five, "demo": {"trails": 4}}))
    with pytest.raises(EdgeVLAError, match=r"unknown key\(s\) \['trails'\]"):
        DemoConfig.for_pretrained(str(d))
