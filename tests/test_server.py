"""The policy server with openpi's real client, many clients at once, bad messages, auth, safety."""

import threading
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("websockets")
pytest.importorskip("openpi_client")

from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from edge_vla.errors import EdgeVLAError
from edge_vla.runtime.policy import ActionResult
from edge_vla.runtime.safety import SafetyConfig, SafetyFilter
from edge_vla.runtime.server import PolicyServer


def openpi_obs(seed=0, size=64, prompt="pick up the butter and put it in the basket"):
    rng = np.random.default_rng(seed)
    return {"observation/image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "observation/state": rng.normal(size=8).astype(np.float32), "prompt": prompt}


class ScriptedPolicy:
    """A stand-in whose output we choose (NaN, out-of-range, slow) to test the safety path."""

    metadata = {"name": "scripted"}
    mode = "direct"

    def __init__(self):
        self.next = None
        self.delay = 0.0
        self.resets = 0

    def act(self, obs):
        assert set(obs) == {"images", "state", "instruction"}
        time.sleep(self.delay)
        a = self.next if self.next is not None else np.zeros(7, np.float32)
        return ActionResult(action=np.asarray(a, np.float32), timings={"total": 1.0}, tokens={"action": 7})

    def reset(self):
        self.resets += 1


def test_many_clients_with_bad_messages_mixed_in(tiny_policy):
    with PolicyServer(tiny_policy, port=0, max_message_bytes=256 * 1024, request_timeout_s=60) as server:
        uri = f"ws://127.0.0.1:{server.port}"
        results, failures = {}, []

        def good_client(i):
            try:
                client = WebsocketClientPolicy(host="127.0.0.1", port=server.port)  # openpi's own client
                meta = client.get_server_metadata()
                assert meta["server"] == "edge-vla" and meta["action_dim"] == 7
                outs = [client.infer(openpi_obs(seed=i * 10 + k)) for k in range(3)]
                results[i] = outs
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                failures.append(f"client {i}: {type(e).__name__}: {e}")

        def bad_client(kind):
            try:
                with connect(uri, max_size=None) as ws:
                    ws.recv(timeout=10)  # metadata
                    if kind == "garbage":
                        ws.send(b"\xc1\xff\x00not msgpack")
                        assert ws.recv(timeout=30).startswith("error: message is not valid msgpack")
                    elif kind == "text":
                        ws.send("hello")
                        assert "binary msgpack" in ws.recv(timeout=30)
                    elif kind == "missing-prompt":
                        obs = openpi_obs()
                        del obs["prompt"]
                        ws.send(msgpack_numpy.packb(obs))
                        assert "prompt" in ws.recv(timeout=30)
                    elif kind == "object-array":
                        ws.send(msgpack_numpy.packb({"prompt": "x", "observation/image": {
                            b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "|O", b"shape": (1,)}}))
                        assert "not allowed" in ws.recv(timeout=30)
                    elif kind == "bad-image":
                        obs = openpi_obs()
                        obs["observation/image"] = obs["observation/image"].astype(np.float32)
                        ws.send(msgpack_numpy.packb(obs))
                        assert "uint8 HxWx3" in ws.recv(timeout=30)
                    elif kind == "oversized":
                        ws.send(b"\x00" * (512 * 1024))
                        # Closed by the server with 1009 (too big); a reply or a timeout is a failure. No
                        # pytest.raises here: its Failed is a BaseException, which this thread would swallow.
                        try:
                            got = ws.recv(timeout=30)
                        except ConnectionClosed as closed:
                            assert closed.rcvd is not None and closed.rcvd.code == 1009, closed
                        else:
                            raise AssertionError(f"an oversized message was answered: {got!r:.80}")
                    elif kind == "vanish":
                        ws.send(msgpack_numpy.packb(openpi_obs()))  # and leaves without reading the reply
                        return
            except Exception as e:  # noqa: BLE001
                failures.append(f"bad client {kind}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=good_client, args=(i,)) for i in range(6)]
        threads += [threading.Thread(target=bad_client, args=(k,)) for k in
                    ("garbage", "text", "missing-prompt", "object-array", "bad-image", "oversized", "vanish")]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not failures, failures
        assert time.time() - t0 < 120
        assert sorted(results) == list(range(6))
        for outs in results.values():
            for out in outs:
                assert out["actions"].shape == (1, 7) and np.isfinite(out["actions"]).all()
                assert (np.abs(out["actions"]) <= 1.0).all()
                assert out["server_timing"]["infer_ms"] > 0 and out["tokens"]["action"] == 7
        # identical observations give identical actions, whatever else the server was doing
        solo = WebsocketClientPolicy(host="127.0.0.1", port=server.port).infer(openpi_obs(seed=0))
        np.testing.assert_array_equal(solo["actions"], results[0][0]["actions"])
        # the health probe answers over plain HTTP
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
            assert r.status == 200 and r.read() == b"OK\n"


def test_api_key_is_required_when_set():
    with PolicyServer(ScriptedPolicy(), port=0, api_key="s3cret") as server:
        with pytest.raises(Exception) as e:
            WebsocketClientPolicy(host="127.0.0.1", port=server.port)
        assert "401" in str(e.value)
        with pytest.raises(Exception):
            WebsocketClientPolicy(host="127.0.0.1", port=server.port, api_key="wrong")
        ok = WebsocketClientPolicy(host="127.0.0.1", port=server.port, api_key="s3cret")
        assert ok.infer(openpi_obs())["actions"].shape == (1, 7)
        from edge_vla.runtime.client import RemotePolicy

        with pytest.raises(EdgeVLAError, match="HTTP 401"):
            RemotePolicy(f"127.0.0.1:{server.port}")


def test_server_safety_nan_clip_and_watchdog():
    policy = ScriptedPolicy()
    safety = SafetyConfig.from_options(deadline_ms=50.0)
    with PolicyServer(policy, port=0, safety=safety, request_timeout_s=1.0) as server:
        client = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
        policy.next = [0.1, 0, 0, 0, 0, 0, 1.0]  # closes the gripper
        assert client.infer(openpi_obs())["safety"] == {"clipped": 0, "deadline_missed": False, "held": False}
        policy.next = [5.0, -3.0, 0.2, 0, 0, 0, 1.0]
        out = client.infer(openpi_obs())
        np.testing.assert_allclose(out["actions"][0], [1.0, -1.0, 0.2, 0, 0, 0, 1.0])
        assert out["safety"]["clipped"] == 2
        policy.next = [np.nan, 0, 0, 0, 0, 0, -1.0]
        out = client.infer(openpi_obs())
        # NaN never leaves: hold (no motion, gripper kept closed as last commanded) plus an error
        np.testing.assert_array_equal(out["actions"][0], [0, 0, 0, 0, 0, 0, 1.0])
        assert "NaN" in out["error"] and out["safety"]["held"]
        policy.next = np.zeros((4, 7)) + np.inf
        assert client.infer(openpi_obs())["actions"].shape == (4, 7)
        policy.next, policy.delay = [0, 0, 0, 0, 0, 0, 1.0], 0.1
        assert client.infer(openpi_obs())["safety"]["deadline_missed"]
        policy.delay = 1.5  # past the request timeout: a hold action and an error, the connection lives on
        out = client.infer(openpi_obs())
        assert "timed out" in out["error"] and np.isfinite(out["actions"]).all()
        policy.delay = 0.0
        time.sleep(1.0)
        assert "error" not in client.infer(openpi_obs())


def test_safety_filter_unit():
    f = SafetyFilter(SafetyConfig.from_options(low=[-0.5] * 6 + [-1.0], high=[0.5] * 6 + [1.0]))
    out = f.filter(np.array([[0.7, -0.7, 0, 0, 0, 0, 1.0], [0, 0, 0, 0, 0, 0, -1.0]]))
    assert out.clipped == 2 and out.error is None
    np.testing.assert_allclose(out.actions[0], [0.5, -0.5, 0, 0, 0, 0, 1.0])
    assert f.filter(np.ones(6)).error.startswith("policy returned actions of shape (6,)")
    held = f.filter(np.array([np.inf] * 7))
    np.testing.assert_array_equal(held.actions, [[0, 0, 0, 0, 0, 0, 1.0]])
    with pytest.raises(EdgeVLAError, match="1 or 7 finite numbers"):
        SafetyConfig.from_options(low=[1, 2])
    with pytest.raises(EdgeVLAError, match="low > high"):
        SafetyConfig.from_options(low=1.0, high=0.0)


def test_remote_policy_and_server_loss():
    from edge_vla.runtime.client import RemotePolicy, ServerLost

    policy = ScriptedPolicy()
    server = PolicyServer(policy, port=0).start()
    remote = RemotePolicy(f"127.0.0.1:{server.port}", timeout_s=10)
    obs = {"images": {"agentview": np.zeros((64, 64, 3), np.uint8), "wrist": np.zeros((64, 64, 3), np.uint8)},
           "state": np.zeros(8, np.float32), "instruction": "pick up the butter"}
    res = remote.act(obs)
    assert res.action.shape == (7,) and "round_trip" in res.timings
    remote.reset()
    assert policy.resets == 1
    server.stop()
    with pytest.raises(ServerLost):
        remote.act(obs)
