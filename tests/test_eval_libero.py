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
