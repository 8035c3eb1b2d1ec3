"""LIBERO rollouts sharded over Ray: the same results file and resume as the local workers."""

import sys

import pytest

pytest.importorskip("libero.libero")
pytestmark = pytest.mark.libero

from edge_vla.errors import EdgeVLAError
from edge_vla.eval import libero_rollout as lr
from edge_vla.eval.results import load_results

SUITE = "libero_90"
BUTTER = "LIVING_ROOM_SCENE2_pick_up_the_butter_and_put_it_in_the_basket"
MILK = "LIVING_ROOM_SCENE2_pick_up_the_milk_and_put_it_in_the_basket"


def test_ray_missing_is_one_clear_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from edge_vla.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without the extra
    r = CliRunner().invoke(main, ["eval", "libero", "expert", "--tasks", BUTTER, "--trials", "1", "--ray", "local",
                                  "--out", str(tmp_path), "--no-progress"])
    assert r.exit_code == 1 and "pip install 'edge-vla[ray]'" in r.output and "Traceback" not in r.output


def test_ray_and_local_runs_share_one_results_file():
    """Where episodes run is not part of what ran: a Ray run resumes a local one and vice versa."""
    local = lr.RolloutConfig(policy="expert", tasks=[BUTTER], trials=2, workers=2)
    on_ray = lr.RolloutConfig(**{**local.__dict__, "ray": "local", "workers": None})
    variant = lr.variant_info(local, lr.ExpertPolicy())
    assert lr._run_config(local, variant) | {"workers": None} == lr._run_config(on_ray, variant)
    assert lr.results_path(local, variant["name"]) == lr.results_path(on_ray, variant["name"])


@pytest.mark.slow
def test_ray_local_two_workers_resume_a_local_run(tmp_path):
    """One episode rolled locally, then the run widened and resumed on a local Ray instance with
    two workers: the finished episode is skipped, the other three run on two actors, and the
    file holds the four records once each, with what local records hold."""
    pytest.importorskip("ray")
    base = dict(policy="expert", suite=SUITE, first_trial=40, out=str(tmp_path), max_steps=60)
    first = lr.run_libero(lr.RolloutConfig(**base, tasks=[BUTTER], trials=1), progress=False)
    assert first["ran"] == 1
    r = lr.run_libero(lr.RolloutConfig(**base, tasks=[BUTTER, MILK], trials=2, workers=2, ray="local"), progress=False)
    assert (r["ran"], r["skipped"]) == (3, 1) and r["path"] == first["path"]
    recs = load_results(r["path"])["records"]
    assert sorted((x["task"], x["trial"]) for x in recs) == [(BUTTER, 40), (BUTTER, 41), (MILK, 40), (MILK, 41)]
    local_rec, ray_recs = recs[0], recs[1:]
    assert all(set(x) == set(local_rec) for x in ray_recs)
    assert len({x["worker"] for x in ray_recs}) == 2 and local_rec["worker"] not in {x["worker"] for x in ray_recs}
    # the expert lifts its object within 60 steps (lifted at ~41 after settling) but does not place it
    assert all(x["outcome"] == "placement_failure" and x["lifted"] == x["target_object"] for x in recs)
    again = lr.run_libero(lr.RolloutConfig(**base, tasks=[BUTTER, MILK], trials=2, ray="local"), progress=False)
    assert (again["ran"], again["skipped"]) == (0, 4)  # nothing left: Ray is not even started
