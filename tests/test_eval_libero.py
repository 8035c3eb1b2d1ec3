"""LIBERO rollouts (real simulator): the scripted expert succeeds, a tiny policy runs, runs resume."""


import numpy as np
import pytest

pytest.importorskip("libero.libero")
pytestmark = pytest.mark.libero

from edge_vla.errors import EdgeVLAError
from edge_vla.eval import libero_rollout as lr
from edge_vla.eval.results import load_results

SUITE = "libero_90"
TASK = "LIVING_ROOM_SCENE2_pick_up_the_butter_and_put_it_in_the_basket"


def test_episode_list_and_shards_are_deterministic():
    eps = lr.episode_list(SUITE, [TASK, "0"], trials=3)
    assert eps[:3] == [(TASK, 0), (TASK, 1), (TASK, 2)] and len(eps) == 6
    shards = [lr.shard_of(eps, (i, 4)) for i in range(4)]
    assert sorted(sum(shards, [])) == sorted(eps)  # a partition: every episode exactly once
    assert lr.shard_of(eps, (1, 4)) == shards[1]
    assert lr.parse_shard("2/4") == (2, 4)
    with pytest.raises(EdgeVLAError, match="not i/N"):
        lr.parse_shard("2of4")
    with pytest.raises(EdgeVLAError, match="invalid"):
        lr.parse_shard("4/4")
    with pytest.raises(EdgeVLAError, match="init states"):
        lr.episode_list(SUITE, [TASK], trials=51)


def test_expert_rollout_succeeds_with_video(tmp_path):
    r = lr.run_libero(lr.RolloutConfig(policy="expert", suite=SUITE, tasks=[TASK], trials=1, out=str(tmp_path),
                                       video_dir=str(tmp_path / "videos")), progress=False)
    doc = load_results(r["path"])
    (rec,) = doc["records"]
    assert rec["success"] is True and 20 < rec["steps"] < 400, rec
    assert doc["summary"]["success_rate"] == 1.0
    assert doc["config"]["protocol"]["seed"] == 7 and doc["config"]["settle_steps"] == 10
    assert doc["environment"]["python"]
    video = rec["video"]
    import imageio.v2 as imageio

    frames = imageio.mimread(video, memtest=False)
    assert len(frames) == rec["steps"] and frames[0].shape[1] == 512


def test_tiny_policy_rollout_resumes_after_interruption(tmp_path, tiny_ckpt, monkeypatch):
    import shutil

    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpts" / "tiny")  # its contents change below
    cfg = lr.RolloutConfig(policy=str(ckpt), suite=SUITE, tasks=[TASK], trials=2, out=str(tmp_path),
                           max_steps=3, mode="direct")
    real = lr.run_episode
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the machine goes away during episode 2
        return real(*a, **k)

    monkeypatch.setattr(lr, "run_episode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lr.run_libero(cfg, progress=False)
    path = lr.results_path(cfg, "tiny-direct")
    doc = load_results(path)  # complete, valid file with the finished episode
    assert [r["trial"] for r in doc["records"]] == [0]
    monkeypatch.setattr(lr, "run_episode", real)
    r = lr.run_libero(cfg, progress=False)
    assert (r["ran"], r["skipped"]) == (1, 1)
    recs = load_results(path)["records"]
    assert [x["trial"] for x in recs] == [0, 1]
    for rec in recs:
        assert rec["success"] is False and rec["steps"] == 3
        assert len(rec["latency_ms"]) == 3 and rec["tokens_generated"] == 3 * 7
    v = load_results(path)["config"]["variant"]
    assert v["backend"] == "torch" and v["mode"] == "direct" and v["bundle_bytes"] > 0
    # other settings in the same file are refused instead of mixed in
    with pytest.raises(EdgeVLAError, match="other settings"):
        lr.run_libero(lr.RolloutConfig(**{**cfg.__dict__, "execute_k": 2}), progress=False)
    # so is the same path with new contents (re-trained, re-exported): its episodes are another policy's
    (ckpt / "config.json").write_text((ckpt / "config.json").read_text() + "\n")
    with pytest.raises(EdgeVLAError, match="policy_sha256"):
        lr.run_libero(cfg, progress=False)
    # ...unless asked to set them aside (the demo does): kept beside, and the new policy rolled afresh
    r = lr.run_libero(cfg, progress=False, set_aside_stale=True)
    aside = r["set_aside"]
    assert aside.exists() and aside.parent == path.parent and aside.name != path.name
    assert [x["trial"] for x in load_results(aside)["records"]] == [0, 1]
    assert (r["ran"], r["skipped"]) == (2, 0)
    again = lr.run_libero(cfg, progress=False, set_aside_stale=True)  # the same policy: resumed
    assert again["set_aside"] is None and (again["ran"], again["skipped"]) == (0, 2)


def test_reason_every_k_reuses_reasoning(tiny_ckpt):
    from edge_vla.runtime.policy import load_policy

    policy = load_policy(tiny_ckpt, backend="torch", mode="full", max_free_tokens=6)
    reuse = lr.ReuseReasoning(policy, every=3)
    rng = np.random.default_rng(0)
    obs = {"images": {c: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for c in ("agentview", "wrist")},
           "state": np.zeros(8, np.float32), "instruction": "pick up the butter and put it in the basket"}
    out = [reuse.act(obs) for _ in range(4)]
    assert [bool(o.info.get("reused_reasoning")) for o in out] == [False, True, True, False]
    assert out[1].reasoning_text == out[0].reasoning_text and out[1].tokens["reasoning"] == 0
    # the same image and the same (reused) reasoning give the same action as reasoning afresh
    np.testing.assert_array_equal(out[1].action, out[0].action)
    assert policy.mode == "full"  # restored after the reuse call
    with pytest.raises(EdgeVLAError, match="full"):
        lr.ReuseReasoning(load_policy(tiny_ckpt, backend="torch", mode="direct"), 2)


def test_eval_libero_cli_errors(tmp_path):
    from click.testing import CliRunner

    from edge_vla.cli import main

    r = CliRunner().invoke(main, ["eval", "libero", str(tmp_path / "nope"), "--tasks", TASK, "--trials", "1",
                                  "--out", str(tmp_path)])
    assert r.exit_code == 1 and "no checkpoint or bundle" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_parallel_workers(tmp_path, tiny_ckpt):
    cfg = lr.RolloutConfig(policy=str(tiny_ckpt), suite=SUITE, tasks=[TASK], trials=2, out=str(tmp_path),
                           max_steps=2, workers=2, mode="direct")
    r = lr.run_libero(cfg, progress=False)
    assert r["ran"] == 2
    assert sorted(x["trial"] for x in load_results(r["path"])["records"]) == [0, 1]


def test_temporal_ensembling_queries_every_step_and_is_recorded(tmp_path, tiny_ckpt):
    cfg = lr.RolloutConfig(policy=str(tiny_ckpt), suite=SUITE, tasks=[TASK], trials=1, out=str(tmp_path),
                           max_steps=4, mode="direct", temporal_ensemble=0.01)
    r = lr.run_libero(cfg, progress=False)
    doc = load_results(r["path"])
    (rec,) = doc["records"]
    assert rec["steps"] == 4 and len(rec["latency_ms"]) == 4
    assert doc["config"]["temporal_ensemble"] == 0.01
    with pytest.raises(EdgeVLAError, match="exclude each other"):
        lr.run_libero(lr.RolloutConfig(**{**cfg.__dict__, "execute_k": 2, "out": str(tmp_path / "b")}), progress=False)


# --- the five-task scene, the lifted-object metric, adaptive mode, LIBERO-PRO ----------------------
BASKET_SET = "living-room-scene2-basket"
MILK = "LIVING_ROOM_SCENE2_pick_up_the_milk_and_put_it_in_the_basket"


def test_task_set_expands_to_the_five_basket_tasks():
    from edge_vla.sim.expert import ScriptedExpert

    eps = lr.episode_list(SUITE, [BASKET_SET], trials=2, first_trial=40)
    tasks = list(dict.fromkeys(t for t, _ in eps))
    assert len(tasks) == 5 and TASK in tasks and MILK in tasks and len(eps) == 10
    assert {trial for _, trial in eps} == {40, 41}
    assert all(t.startswith("LIVING_ROOM_SCENE2_pick_up_the_") and ScriptedExpert.covers(SUITE, t) for t in tasks)
    # a set and one of its members: each task once
    assert lr.episode_list(SUITE, [TASK, BASKET_SET], trials=1)[0] == (TASK, 0)
    assert len(lr.episode_list(SUITE, [TASK, BASKET_SET], trials=1)) == 5
    with pytest.raises(EdgeVLAError, match="living-room-scene2-basket"):  # a typo names the sets too
        lr.episode_list(SUITE, ["living-room-scene2-baskets"], trials=1)


def test_lifted_object_says_right_wrong_placement(tmp_path):
    """The expert lifts the butter (success); the expert of the milk task in the butter task's scene
    lifts the milk (wrong object); stopped after the lift, the right object was lifted but not
    placed (placement failure); stopped before, nothing was lifted (grasp failure)."""
    from edge_vla.sim.env import LiberoEnv

    def episode(goal_object=None, max_steps=400):
        env = LiberoEnv(SUITE, TASK, cameras=(), max_steps=max_steps)
        try:
            return lr.run_episode(env, lr.ExpertPolicy(goal_object), 40)
        finally:
            env.close()

    right = episode()
    assert right["success"] and right["outcome"] == "success"
    assert right["lifted"] == right["target_object"] == "butter_1" and right["lifted_objects"] == ["butter_1"]
    assert right["max_rise_m"]["butter_1"] > 0.1 and right["max_rise_m"]["milk_1"] < 0.01
    wrong = episode("milk_1", max_steps=90)
    assert not wrong["success"] and wrong["outcome"] == "wrong_object" and wrong["lifted"] == "milk_1"
    assert wrong["max_rise_m"]["butter_1"] < 0.01
    dropped = episode(max_steps=60)  # lifted at ~step 41 (after 10 settle steps), placed at ~84
    assert dropped["outcome"] == "placement_failure" and dropped["lifted"] == "butter_1"
    assert episode(max_steps=15)["outcome"] == "grasp_failure"
    assert right["destination_object"] == "basket_1"


def test_lifting_the_destination_is_a_failed_grasp_not_a_wrong_object():
    """The basket of "put it in the basket" is named by the instruction: lifting it is not the
    grounding error that `wrong_object` counts; another grocery is."""
    from edge_vla.sim.lift import destination_object, outcome

    objects = dict.fromkeys(["butter_1", "milk_1", "basket_1", "basket_10"])
    pv = {"goal": [["in", "butter_1", "basket_1_contain_region"]], "objects": objects}
    assert destination_object(pv) == "basket_1"
    assert destination_object({"goal": [["on", "butter_1", "milk_1"]], "objects": objects}) == "milk_1"
    assert destination_object({"goal": [], "objects": objects}) is None
    lift = {"target": "butter_1", "destination": "basket_1"}
    assert outcome(False, {**lift, "lifted_objects": ["basket_1"]}) == "grasp_failure"
    assert outcome(False, {**lift, "lifted_objects": ["basket_1", "milk_1"]}) == "wrong_object"
    assert outcome(False, {**lift, "lifted_objects": ["basket_1", "butter_1"]}) == "placement_failure"
    assert outcome(True, {**lift, "lifted_objects": ["basket_1"]}) == "success"


def test_five_task_eval_reports_per_task_pooled_and_failures(tmp_path):
    from click.testing import CliRunner

    from edge_vla.cli import main
    from edge_vla.eval.report import build_report

    out = tmp_path / "runs"
    r = CliRunner().invoke(main, ["eval", "libero", "expert", "--tasks", BASKET_SET, "--trials", "1",
                                  "--first-trial", "40", "--max-steps", "15", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "success 0/5" in r.output and "grasp failure 5" in r.output and f"{MILK}: 0/1" in r.output
    doc = load_results(out / "scripted-expert.json")
    per_task = doc["summary"]["per_task"]
    assert len(per_task) == 5 and all(t["episodes"] == 1 and t["success_ci95"][1] > 0.7 for t in per_task.values())
    assert doc["summary"]["wrong_object"]["count"] == 0 and doc["summary"]["outcomes"] == {"grasp_failure": 5}
    assert {rec["target_object"] for rec in doc["records"]} == {"alphabet_soup_1", "butter_1", "milk_1",
                                                                  "orange_juice_1", "tomato_sauce_1"}
    build_report([out], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "all tasks (pooled)" in md and "0/5 [0–43%]" in md and "## Why episodes failed" in md


def test_adaptive_mode_records_how_often_it_reasons(tmp_path, tiny_ckpt):
    """direct never reasons, adaptive reasons when its action tokens are uncertain (a threshold below
    any entropy: every call; above any: none), and the report shows the rate and both latencies."""
    from click.testing import CliRunner

    from edge_vla.cli import main
    from edge_vla.eval.report import build_report

    out = tmp_path / "runs"
    common = [str(tiny_ckpt), "--tasks", TASK, "--trials", "1", "--max-steps", "2", "--out", str(out),
              "--max-free-tokens", "4", "--no-progress"]
    r = CliRunner().invoke(main, ["eval", "libero", *common, "--mode", "direct,adaptive", "--entropy-threshold", "-1"])
    assert r.exit_code == 0, r.output
    assert r.output.count("reasoned on") == 1 and "reasoned on 100% of 2 calls" in r.output  # direct: no line
    direct = load_results(out / "tiny-direct.json")
    adaptive = load_results(out / "tiny-adaptive.json")
    assert direct["records"][0]["reasoned"] == [False, False] and direct["summary"]["reasoning_rate"] == 0
    rec = adaptive["records"][0]
    assert rec["reasoned"] == [True, True] and len(rec["latency_ms"]) == 2
    assert rec["tokens_generated"] > 2 * 7  # reasoning tokens on top of the action tokens
    assert adaptive["summary"]["latency_by_path"]["reasoned"]["calls"] == 2
    # above any entropy: adaptive stays direct, and the record says it did not reason
    from edge_vla.runtime.policy import load_policy

    never = load_policy(tiny_ckpt, backend="torch", mode="adaptive", entropy_threshold=1e9, max_free_tokens=4)
    rng = np.random.default_rng(0)
    obs = {"images": {c: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for c in ("agentview", "wrist")},
           "state": np.zeros(8, np.float32), "instruction": "pick up the butter and put it in the basket"}
    res = never.act(obs)
    assert res.info["adaptive"]["reasoned"] is False and lr._reasoned(never, res) is False
    assert res.tokens["reasoning"] == 0
    build_report([out], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Reasoning per call" in md and "| tiny-adaptive | adaptive | 2 | 100% |" in md


def test_libero_pro_perturbations_are_listed_and_rolled_out(tmp_path, tiny_ckpt):
    from edge_vla.sim.env import perturbations

    assert perturbations(SUITE) == ()  # LIBERO-PRO perturbs none of LIBERO-90's tasks
    assert {"swap", "lan", "object", "task"} <= set(perturbations("libero_10"))
    with pytest.raises(EdgeVLAError, match="no runnable perturbation of libero_90.*libero_10 \\("):
        lr.RolloutConfig(policy="expert", perturbation="swap").run_suite
    with pytest.raises(EdgeVLAError, match="valid: .*swap"):
        lr.RolloutConfig(policy="expert", suite="libero_10", perturbation="swapped").run_suite
    task = "LIVING_ROOM_SCENE2_put_both_the_alphabet_soup_and_the_tomato_sauce_in_the_basket"
    cfg = lr.RolloutConfig(policy=str(tiny_ckpt), suite="libero_10", perturbation="swap", tasks=[task], trials=1,
                           max_steps=2, out=str(tmp_path), mode="direct")
    r = lr.run_libero(cfg, progress=False)
    doc = load_results(r["path"])
    (rec,) = doc["records"]
    assert rec["suite"] == "libero_10_swap" and rec["id"].startswith("libero_10_swap/") and rec["steps"] == 2
    assert doc["config"]["variant"]["perturbation"] == "swap" and r["path"].endswith("tiny-direct-swap.json")
    assert rec["outcome"] is None  # two objects to move: no single target to judge the lift by
    # the language perturbation's instruction is its BDDL's, not the file name the benchmark reads
    from edge_vla.sim.env import LiberoEnv

    with LiberoEnv("libero_10_lan", task, cameras=()) as env:
        assert env.instruction == "place alphabet soup and tomato sauce into basket" != env.task.language


def test_data_generate_takes_task_sets(tmp_path):
    from click.testing import CliRunner

    from edge_vla.cli import main

    r = CliRunner().invoke(main, ["data", "generate", "--list-tasks"])
    assert r.exit_code == 0 and f"{BASKET_SET} (task set): " in r.output and MILK in r.output
    r = CliRunner().invoke(main, ["data", "generate", "--out", str(tmp_path / "d"), "--tasks", BASKET_SET + "s",
                                  "--no-progress"])
    assert r.exit_code == 1 and f"did you mean `{BASKET_SET}`" in r.output and "Traceback" not in r.output
