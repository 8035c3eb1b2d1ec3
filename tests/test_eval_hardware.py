"""Hardware rollouts against a LIBERO-backed simulated robot, through the real policy server."""

import numpy as np
import pytest

pytest.importorskip("libero.libero")
pytestmark = pytest.mark.libero

from edge_vla.errors import EdgeVLAError
from edge_vla.eval import hardware as hw
from edge_vla.eval.results import load_results
from edge_vla.runtime.client import RemotePolicy
from edge_vla.runtime.server import PolicyServer

TASK = "LIVING_ROOM_SCENE2_pick_up_the_butter_and_put_it_in_the_basket"


@pytest.fixture(scope="module")
def robot():
    r = hw.make_robot(f"libero:libero_90/{TASK}@3", max_steps=4)
    yield r
    r.close()


def test_hardware_loop_through_server_records_hdf5(tmp_path, robot, tiny_policy):
    from edge_vla.data.libero_hdf5 import LiberoHDF5

    with PolicyServer(tiny_policy, port=0) as server:
        remote = RemotePolicy(f"ws://127.0.0.1:{server.port}")
        cfg = hw.HardwareConfig(policy=f"ws://127.0.0.1:{server.port}", robot="unused", episodes=2, max_steps=4,
                                success="ask", out=str(tmp_path), name="tiny-remote")
        answers = iter([True, False])
        r = hw.run_hardware(cfg, robot=robot, policy=remote, ask=lambda: next(answers))
    doc = load_results(r["path"])
    assert doc["kind"] == "hardware"
    assert [x["success"] for x in doc["records"]] == [True, False]
    assert doc["summary"]["successes"] == 1 and doc["summary"]["episodes"] == 2
    rec = doc["records"][0]
    assert rec["steps"] == 4 and len(rec["latency_ms"]) == 4 and rec["error"] is None
    assert len(r["episodes"]) == 2
    with LiberoHDF5(r["episodes"][0]) as f:
        assert f.instruction == robot.instruction
        assert f.actions("demo_0").shape == (4, 7)
        img = f.image("demo_0", "agentview", 0)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8


def test_server_lost_mid_episode_holds_robot(tmp_path, robot, tiny_policy):
    server = PolicyServer(tiny_policy, port=0).start()
    remote = RemotePolicy(f"127.0.0.1:{server.port}", timeout_s=5)

    class DropsServer:  # the server dies after the first answer of the episode
        metadata, mode = remote.metadata, remote.mode

        def __init__(self):
            self.calls = 0

        def reset(self):
            remote.reset()

        def act(self, obs):
            self.calls += 1
            if self.calls == 2:
                server.stop()
            return remote.act(obs)

    holds = robot.holds
    cfg = hw.HardwareConfig(policy="ws://gone", robot="unused", episodes=2, max_steps=4, success="yes",
                            out=str(tmp_path), name="lost")
    with pytest.raises(EdgeVLAError, match="aborted, the robot was held"):
        hw.run_hardware(cfg, robot=robot, policy=DropsServer())
    assert robot.holds == holds + 1
    (rec,) = load_results(tmp_path / "lost.hardware.json")["records"]
    assert rec["success"] is None and "lost the policy server" in rec["error"]
    assert not (tmp_path / "episodes").exists() or not list((tmp_path / "episodes").rglob("*.hdf5"))


def test_robot_spec_errors():
    with pytest.raises(EdgeVLAError, match="libero:SUITE/TASK"):
        hw.make_robot("libero:nonsense")
    with pytest.raises(EdgeVLAError, match="cannot import robot class"):
        hw.make_robot("no_such_module_xyz:Robot")
    with pytest.raises(EdgeVLAError, match="success auto"):
        hw.judge(object(), "auto")


def test_action_space_mismatch_holds_the_robot():
    """A policy answering 6-D actions never reaches the robot: it is held and the episode aborted."""
    from edge_vla.runtime.policy import ActionResult

    class SixDof:
        def reset(self):
            pass

        def act(self, obs):
            return ActionResult(action=np.zeros(6, np.float32))

    class Recorder:  # the robot interface, as a user's robot class implements it
        instruction = "stack the blocks"

        def __init__(self):
            self.actions, self.holds = [], 0

        def reset(self):
            return {"images": {"agentview": np.zeros((8, 8, 3), np.uint8)}, "state": np.zeros(8, np.float32),
                    "instruction": self.instruction}

        def step(self, action):
            self.actions.append(action)
            return self.reset()

        def hold(self):
            self.holds += 1

        def close(self):
            pass

    robot = Recorder()
    ep = hw.run_episode(robot, SixDof(), max_steps=5)
    assert robot.actions == [] and robot.holds == 1
    assert "shape (6,)" in ep["error"] and ep["_recording"] is None
