"""The policy server under abuse: concurrent clients with malformed messages mixed in, image shapes
that would make it allocate, over-long prompts, SIGTERM mid-request, what clients see of the
server. Loopback (127.0.0.1) only; every loop is bounded in count and time and stops by itself."""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("websockets")
pytest.importorskip("openpi_client")

import msgpack
from click.testing import CliRunner
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from edge_vla.model.image import RESIZE_CACHE_BYTES, resize_cache_bytes, resize_matrix
from edge_vla.runtime.server import PolicyServer

PROMPT = "pick up the butter and put it in the basket"


def openpi_obs(seed=0, size=64, prompt=PROMPT):
    rng = np.random.default_rng(seed)
    return {"observation/image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "observation/state": rng.normal(size=8).astype(np.float32), "prompt": prompt}


def raw_array(data: bytes, dtype: str, shape) -> dict:
    """An array as openpi's msgpack_numpy writes it, with whatever shape we claim."""
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": list(shape)}


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt


def long_prompt(policy, n_tokens: int) -> str:
    """A prompt of about `n_tokens` of the policy's own tokens (counted with its processor)."""
    words = PROMPT.split()
    text = PROMPT
    while len(policy.processor.prompt_ids(text)) < n_tokens:
        text += " " + " ".join(words[: max(1, (n_tokens - len(policy.processor.prompt_ids(text))) // 2)])
    while len(policy.processor.prompt_ids(text)) > n_tokens:
        text = text.rsplit(" ", 1)[0]
    return text


def malformed(kind: str, i: int, policy) -> bytes | str:
    """One bad message of `kind` (the i-th of its kind: sizes vary)."""
    obs = openpi_obs(seed=i)
    pack = msgpack_numpy.packb
    if kind == "garbage":
        return np.random.default_rng(i).integers(0, 256, 64 + i, dtype=np.uint8).tobytes()
    if kind == "truncated":
        return pack(obs)[: 100 + i]
    if kind == "text":
        return "hello"
    if kind == "not-a-map":
        return msgpack.packb([1, 2, 3])
    if kind == "no-prompt":
        del obs["prompt"]
        return pack(obs)
    if kind == "blank-prompt":
        return pack({**obs, "prompt": "   "})
    if kind == "prompt-not-str":
        return pack({**obs, "prompt": 42})
    if kind == "object-dtype":
        return msgpack.packb({"prompt": "x", "observation/image": raw_array(b"\0" * 8, "|O", (1,))})
    if kind == "float-image":
        return pack({**obs, "observation/image": obs["observation/image"].astype(np.float32)})
    if kind == "2d-image":
        return pack({**obs, "observation/image": obs["observation/image"][..., 0]})
    if kind == "4-channels":
        return pack({**obs, "observation/image": np.zeros((64, 64, 4), np.uint8)})
    if kind == "wide-image":  # what pinned ~400 MB per request through the resize cache
        return pack({**obs, "observation/image": np.zeros((2, 5000 + i, 3), np.uint8)})
    if kind == "one-pixel":
        return pack({**obs, "observation/image": np.zeros((1, 1, 3), np.uint8)})
    if kind == "huge-dims":  # a shape whose element count wraps an int64 to 0
        return msgpack.packb({"prompt": "x", "observation/image": raw_array(b"", "|u1", (2**32, 2**32, 3))})
    if kind == "negative-dims":
        return msgpack.packb({"prompt": "x", "observation/image": raw_array(b"", "|u1", (-1, 0, 3))})
    if kind == "many-dims":
        return msgpack.packb({"prompt": "x", "observation/image": raw_array(b"\0", "|u1", (1,) * 12)})
    if kind == "short-data":
        return msgpack.packb({"prompt": "x", "observation/image": raw_array(b"\0" * 10, "|u1", (64, 64, 3))})
    if kind == "many-keys":  # millions of tiny entries would be millions of Python objects
        return msgpack.packb({str(k): k for k in range(20_000)})
    if kind == "unknown-camera":
        return pack({"images": {"agentview": obs["observation/image"], "wrist": obs["observation/wrist_image"],
                                **{f"cam{k}": obs["observation/image"] for k in range(5)}}, "prompt": PROMPT})
    if kind == "missing-camera":
        del obs["observation/wrist_image"]
        return pack(obs)
    if kind == "long-prompt":
        return pack({**obs, "prompt": "butter " * 3000})
    if kind == "huge-state":
        return pack({**obs, "observation/state": np.zeros(5000, np.float32)})
    if kind == "string-state":
        return pack({**obs, "observation/state": "up"})
    if kind == "nested":
        return b"\x91" * 5000 + b"\x00"  # [[[[...]]]] deeper than msgpack's stack
    if kind == "nan-state":  # reaches the policy, which refuses it: still one line
        return pack({**obs, "observation/state": np.full(8, np.nan, np.float32)})
    raise AssertionError(kind)


KINDS = ("garbage", "truncated", "text", "not-a-map", "no-prompt", "blank-prompt", "prompt-not-str", "object-dtype",
         "float-image", "2d-image", "4-channels", "wide-image", "one-pixel", "huge-dims", "negative-dims",
         "many-dims", "short-data", "many-keys", "unknown-camera", "missing-camera", "long-prompt", "huge-state",
         "string-state", "nested", "nan-state")


def test_concurrent_clients_with_malformed_messages_mixed_in(tiny_policy, caplog):
    """8 clients of good requests (openpi's own client), 6 clients sending every kind of bad message
    in a seeded order, plus stalled, vanishing and oversized ones: each bad message is answered with
    one text line, no good request fails, nothing leaks into the resize cache, and it still serves."""
    caplog.set_level(logging.WARNING, logger="edge_vla")
    deadline = time.monotonic() + 90
    with PolicyServer(tiny_policy, port=0, max_message_bytes=1 << 20, request_timeout_s=60) as server:
        uri = f"ws://127.0.0.1:{server.port}"
        good, bad, failures, sent_bad = {}, [], [], []
        lock = threading.Lock()

        def good_client(i):
            try:
                client = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
                good[i] = [client.infer(openpi_obs(seed=100 + 4 * i + k)) for k in range(4)]
            except Exception as e:  # noqa: BLE001 - asserted below
                failures.append(f"good {i}: {type(e).__name__}: {e}")

        def bad_client(i):
            order = np.random.default_rng(i).permutation(len(KINDS))
            try:
                with connect(uri, max_size=None, open_timeout=20) as ws:
                    ws.recv(timeout=20)  # metadata
                    for k in order:
                        if time.monotonic() > deadline:
                            break
                        ws.send(malformed(KINDS[k], i, tiny_policy))
                        reply = ws.recv(timeout=60)
                        with lock:
                            sent_bad.append(KINDS[k])
                            bad.append((KINDS[k], reply))
            except Exception as e:  # noqa: BLE001
                failures.append(f"bad {i}: {type(e).__name__}: {e}")

        def rude_client(kind):
            try:
                with connect(uri, max_size=None, open_timeout=20) as ws:
                    ws.recv(timeout=20)
                    if kind == "stall":
                        time.sleep(2.0)  # connected, says nothing, leaves
                    elif kind == "vanish":
                        ws.send(msgpack_numpy.packb(openpi_obs()))  # leaves without the reply
                    elif kind == "oversized":
                        ws.send(b"\0" * (2 << 20))
                        try:  # not pytest.raises: its Failed is a BaseException this thread would swallow
                            got = ws.recv(timeout=30)
                        except ConnectionClosed as closed:
                            assert closed.rcvd is not None and closed.rcvd.code == 1009, closed
                        else:
                            raise AssertionError(f"an oversized message was answered: {got!r:.80}")
            except Exception as e:  # noqa: BLE001
                failures.append(f"rude {kind}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=good_client, args=(i,)) for i in range(8)]
        threads += [threading.Thread(target=bad_client, args=(i,)) for i in range(6)]
        threads += [threading.Thread(target=rude_client, args=(k,)) for k in ("stall", "vanish", "oversized") * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "clients still running at the deadline"
        assert not failures, failures

        assert sorted(good) == list(range(8))
        for outs in good.values():
            for out in outs:
                assert out["actions"].shape == (1, 7) and np.isfinite(out["actions"]).all() and "error" not in out
        assert len(bad) == 6 * len(KINDS)
        for kind, reply in bad:
            assert isinstance(reply, str) and reply.startswith("error: ") and "\n" not in reply, (kind, reply)
            assert len(reply) < 300 and "Traceback" not in reply, (kind, reply)
        # every refusal is one log line, and nothing else was logged at warning level but holds
        refusals = [r for r in caplog.records if r.getMessage().startswith("refused a request from 127.0.0.1:")]
        assert len(refusals) == len(bad) and not any(r.exc_info for r in caplog.records)
        assert server.stats["refused"] == len(bad)
        assert resize_cache_bytes() <= RESIZE_CACHE_BYTES
        # still serving, same answers as before the storm
        again = WebsocketClientPolicy(host="127.0.0.1", port=server.port).infer(openpi_obs(seed=100))
        np.testing.assert_array_equal(again["actions"], good[0][0]["actions"])


def test_image_shapes_cannot_make_the_server_allocate(tiny_policy):
    """Item: (2, 500000+i, 3) images (3 MB, under the message limit) built 64 x 500000 resize
    weights, held ~400 MB in the cache and blocked the policy worker ~2 s each. Now refused at once."""
    before = resize_cache_bytes()
    with PolicyServer(tiny_policy, port=0) as server:
        with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as ws:
            ws.recv(timeout=10)
            for i in range(3):
                obs = {**openpi_obs(), "observation/image": np.zeros((2, 500_000 + i, 3), np.uint8)}
                t0 = time.perf_counter()
                ws.send(msgpack_numpy.packb(obs))
                reply = ws.recv(timeout=30)
                assert reply == (f"error: image for camera `agentview` is 2x{500_000 + i} px; "
                                 "this server takes 2 to 4096 px a side"), reply
                assert time.perf_counter() - t0 < 1.0
            ws.send(msgpack_numpy.packb(openpi_obs()))  # a good one right after: served
            assert not isinstance(ws.recv(timeout=30), str)
        assert server.metadata["max_image_side"] == 4096
    assert resize_cache_bytes() <= max(before, RESIZE_CACHE_BYTES)


def test_resize_cache_is_bounded_in_bytes():
    """64 widths at the largest side a server accepts: the cache stays under its byte bound (an
    lru_cache of 64 entries held them all) and gives the same weights as a fresh computation."""
    for w in range(4096 - 64, 4096):
        resize_matrix(w, 224)
    assert resize_cache_bytes() <= RESIZE_CACHE_BYTES
    m = resize_matrix(4000, 224)
    assert m.shape == (224, 4000) and not m.flags.writeable
    np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-5)


def test_overlong_prompt_is_a_bad_request_in_one_line(tiny_policy, caplog):
    """Item: a ~2,400-token prompt was a policy failure (hold reply, ~30 lines of traceback). It is
    a bad request: one text line to the client, one line in the log; a prompt at the limit is served."""
    caplog.set_level(logging.INFO, logger="edge_vla")
    with PolicyServer(tiny_policy, port=0) as server:
        limit = server.max_prompt_tokens
        # 2048 positions less the 33 prefix tokens (2 cameras x 4x4 pooled patches + state) and the
        # direct decode (" ACTION:" + 7 action tokens)
        assert limit == 2048 - 33 - len(tiny_policy.inference_prefix_ids) - 7
        assert server.metadata["max_prompt_tokens"] == limit
        client = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
        too_long = long_prompt(tiny_policy, 2400)
        with pytest.raises(Exception) as e:  # openpi's client raises the server's text line
            client.infer(openpi_obs(prompt=too_long))
        n = len(tiny_policy.processor.prompt_ids(too_long))
        assert str(e.value).splitlines()[-1] == (f"error: prompt is {n} tokens; this model takes at most {limit} "
                                                 "(its positions less the image prefix and the decode)")
        lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(lines) == 1 and lines[0].getMessage().startswith("refused a request from 127.0.0.1:")
        assert f"prompt is {n} tokens" in lines[0].getMessage() and not lines[0].exc_info
        at_limit = long_prompt(tiny_policy, limit)
        assert len(tiny_policy.processor.prompt_ids(at_limit)) <= limit
        out = WebsocketClientPolicy(host="127.0.0.1", port=server.port).infer(openpi_obs(prompt=at_limit))
        assert out["actions"].shape == (1, 7) and "error" not in out
        assert out["tokens"]["prompt"] > limit - 10


def test_serve_help_prefers_the_environment_variable_for_the_key():
    from edge_vla.cli import main

    res = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200)
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "Prefer the environment variable EDGE_VLA_API_KEY" in text and "visible to every user in `ps`" in text


def _lines(stream, q):
    for line in iter(stream.readline, ""):
        q.put(line)
    q.put(None)


def test_cli_serve_hides_paths_logs_refusals_and_stops_gracefully_on_sigterm(ckpt, tmp_path):
    """Items: metadata showed the server's bundle path to every client; refused requests were not
    logged; SIGTERM killed the server at once (rc 143, no reply, clients saw 1006). Now: the
    artefact's name only, one log line per refusal, and on SIGTERM every request in flight is
    answered (its action, or a hold), every connection closes with 1001, one log line, rc 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGE_VLA_API_KEY": "s3cret"}
    proc = subprocess.Popen([sys.executable, "-m", "edge_vla.cli", "serve", str(ckpt), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out_q, err_q = queue.Queue(), queue.Queue()
    for stream, q in ((proc.stdout, out_q), (proc.stderr, err_q)):
        threading.Thread(target=_lines, args=(stream, q), daemon=True).start()
    try:
        port = None
        t_end = time.monotonic() + 120
        while port is None and time.monotonic() < t_end:
            try:
                line = out_q.get(timeout=max(0.1, t_end - time.monotonic()))
            except queue.Empty:
                break
            assert line is not None, "serve exited before listening"
            m = re.search(r"ws://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port, "serve did not report its port"

        client = WebsocketClientPolicy(host="127.0.0.1", port=port, api_key="s3cret")
        meta = client.get_server_metadata()
        assert meta["policy"] == ckpt.name
        flat = repr(meta)
        assert str(ckpt.parent) not in flat and str(tmp_path.parent) not in flat and os.sep + "tmp" not in flat
        with pytest.raises(Exception, match="lacks `prompt`"):
            bad = openpi_obs()
            del bad["prompt"]
            client.infer(bad)

        # three connections, each with a request sent and not yet answered, then SIGTERM
        conns = [connect(f"ws://127.0.0.1:{port}", additional_headers={"Authorization": "Api-Key s3cret"},
                         max_size=None, open_timeout=20) for _ in range(3)]
        for k, ws in enumerate(conns):
            ws.recv(timeout=20)
            ws.send(msgpack_numpy.packb(openpi_obs(seed=k)))
        proc.send_signal(signal.SIGTERM)
        for ws in conns:
            reply = msgpack_numpy.unpackb(ws.recv(timeout=60))  # answered, not dropped
            assert reply["actions"].shape == (1, 7) and np.isfinite(reply["actions"]).all()
            assert "error" not in reply or "shutting down" in reply["error"]
            with pytest.raises(ConnectionClosed) as e:
                ws.recv(timeout=30)
            assert e.value.rcvd is not None and e.value.rcvd.code == 1001, e.value
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    err = []
    while (line := err_q.get(timeout=10)) is not None:
        err.append(line.rstrip("\n"))
    refused = [x for x in err if "refused a request from 127.0.0.1:" in x]
    assert len(refused) == 1 and "lacks `prompt`" in refused[0]
    stopped = [x for x in err if "stopped (SIGTERM)" in x]
    assert len(stopped) == 1 and "closed 4 connection(s) with 1001" in stopped[0], err
    assert not any("Traceback" in x for x in err), err


def test_remote_policy_names_a_graceful_stop(tiny_policy):
    """edge-vla's own client tells a server that stopped on purpose (1001) from one that vanished."""
    from edge_vla.runtime.client import RemotePolicy, ServerLost

    server = PolicyServer(tiny_policy, port=0).start()
    remote = RemotePolicy(f"127.0.0.1:{server.port}", timeout_s=30)
    obs = {"images": {"agentview": np.zeros((64, 64, 3), np.uint8), "wrist": np.zeros((64, 64, 3), np.uint8)},
           "state": np.zeros(8, np.float32), "instruction": PROMPT}
    assert remote.act(obs).action.shape == (7,)
    server.stop()
    with pytest.raises(ServerLost, match=r"closed 1001: policy server shutting down"):
        remote.act(obs)
