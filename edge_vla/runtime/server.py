"""A websocket policy server speaking openpi's protocol, so robot code written for
`openpi_client.websocket_client_policy.WebsocketClientPolicy` works unchanged.

Protocol (openpi's): on connect the server sends its metadata (msgpack); then each binary frame
from the client is one observation (msgpack dict, numpy arrays via openpi_client.msgpack_numpy)
and the server answers with one binary frame: a dict whose `actions` is a (K, D) float32 array.
A text frame from the server is an error (openpi's client raises it as RuntimeError); it is one
short line, never a traceback. `GET /healthz` answers 200 OK without a websocket.

Observation keys follow openpi's LIBERO example:
    observation/image (uint8 HxWx3, upright) -> first camera, observation/wrist_image -> second,
    observation/state (8,) -> state, prompt (str) -> instruction.
Native keys ({"images": {camera: ...}, "state", "instruction"}) are accepted too.

Replies add `server_timing` {infer_ms, queue_ms, total_ms, prev_total_ms}, the policy's own
`policy_timing` and `tokens`, `reasoning` (full mode), and `safety` {clipped, deadline_missed,
held}; when the policy's output is unusable (NaN/Inf, wrong shape) or the request timed out, the
reply carries a hold action plus `error` so the robot stays still.

One policy serves every client; calls run one at a time on a worker thread (a policy is not
thread-safe, and on an edge device parallel calls would only share the same accelerator).
"""

from __future__ import annotations

import asyncio
import hmac
import http
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edge_vla.errors import EdgeVLAError, MissingDependencyError
from edge_vla.runtime.safety import SafetyConfig, SafetyFilter

log = logging.getLogger("edge_vla.server")

OPENPI_IMAGE_KEYS = ("observation/image", "observation/wrist_image")
# dtypes a client may send: numbers and booleans only (no object arrays, no void records).
_ALLOWED_KINDS = set("biuf")


class BadRequest(Exception):
    """A client message we cannot use; the text goes back to that client only."""


def _imports():
    try:
        import msgpack
        import websockets  # noqa: F401
        from openpi_client import msgpack_numpy
    except ImportError as e:
        raise MissingDependencyError("websockets msgpack openpi-client", "the policy server",
                                     'install it with `pip install -e ".[serve]"`') from e
    return msgpack, msgpack_numpy


def _unpack_array(obj):
    """openpi_client.msgpack_numpy's hook, made strict: numeric dtypes only, sizes must agree."""
    if b"__ndarray__" in obj:
        try:
            dtype = np.dtype(obj[b"dtype"])
            shape = tuple(int(s) for s in obj[b"shape"])
        except (TypeError, ValueError, KeyError) as e:
            raise BadRequest(f"malformed array ({e})") from None
        if dtype.kind not in _ALLOWED_KINDS:
            raise BadRequest(f"array dtype {dtype} is not allowed (send numeric arrays)")
        data = obj.get(b"data", b"")
        if not isinstance(data, bytes) or len(data) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise BadRequest("array data does not match its shape and dtype")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()  # writable, owns its memory
    if b"__npgeneric__" in obj:
        try:
            dtype = np.dtype(obj[b"dtype"])
            if dtype.kind not in _ALLOWED_KINDS:
                raise BadRequest(f"scalar dtype {dtype} is not allowed")
            return dtype.type(obj[b"data"])
        except (TypeError, ValueError, KeyError) as e:
            raise BadRequest(f"malformed scalar ({e})") from None
    return obj


def decode_message(data: bytes) -> dict:
    msgpack, _ = _imports()
    try:
        msg = msgpack.unpackb(data, object_hook=_unpack_array, strict_map_key=False)
    except BadRequest:
        raise
    except Exception as e:
        raise BadRequest(f"message is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(msg, dict):
        raise BadRequest(f"message must be a map (dict), got {type(msg).__name__}")
    return msg


def encode_message(obj) -> bytes:
    _, msgpack_numpy = _imports()
    return msgpack_numpy.packb(obj)


def to_policy_obs(msg: dict, cameras: list[str]) -> dict:
    """openpi LIBERO keys (or native keys) -> the Policy's observation dict."""
    if "images" in msg:
        images = msg["images"]
        if not isinstance(images, dict):
            raise BadRequest("`images` must be a map camera -> uint8 HxWx3 array")
    else:
        present = [k for k in OPENPI_IMAGE_KEYS if k in msg]
        if not present:
            raise BadRequest(f"observation lacks images: send {', '.join(OPENPI_IMAGE_KEYS)} (uint8 HxWx3)")
        images = {cam: msg[key] for cam, key in zip(cameras, OPENPI_IMAGE_KEYS) if key in msg}
    for cam, img in images.items():
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
            desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
            raise BadRequest(f"image for camera `{cam}` must be a uint8 HxWx3 array, got {desc}")
    instruction = msg.get("prompt", msg.get("instruction"))
    if not isinstance(instruction, str) or not instruction.strip():
        raise BadRequest("observation lacks `prompt` (the task instruction, a non-empty string)")
    state = msg.get("observation/state", msg.get("state"))
    if state is not None:
        state = np.asarray(state)
        if state.dtype.kind not in "biuf":
            raise BadRequest("`observation/state` must be a numeric array")
    return {"images": dict(images), "state": state, "instruction": instruction}


class PolicyServer:
    """Serve one policy (anything with `act(obs)`, `reset()`, optional `metadata`) over websockets."""

    def __init__(self, policy, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 max_message_bytes: int = 8 << 20, request_timeout_s: float = 30.0, idle_timeout_s: float | None = 600.0,
                 max_clients: int = 64, safety: SafetyConfig | None = None, metadata: dict | None = None):
        _imports()
        self.policy = policy
        self.host, self.port = host, int(port)
        self.api_key = api_key or None
        self.max_message_bytes = int(max_message_bytes)
        self.request_timeout_s = float(request_timeout_s)
        self.idle_timeout_s = idle_timeout_s
        self.max_clients = int(max_clients)
        self.safety = safety or SafetyConfig()
        self.cameras = list(getattr(getattr(getattr(policy, "processor", None), "config", None), "cameras", None)
                            or ("agentview", "wrist"))
        self.metadata = self._metadata(metadata)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        self._clients = 0
        self._stats = {"requests": 0, "errors": 0, "held": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    def _metadata(self, extra: dict | None) -> dict:
        meta = dict(getattr(self.policy, "metadata", None) or {})
        meta.update({
            "server": "edge-vla", "protocol": "openpi-websocket",
            "mode": getattr(self.policy, "mode", None),
            "recipe": (getattr(self.policy, "recipe", None) or {}).get("name"),
            "backend": getattr(getattr(self.policy, "backend", None), "name", None),
            "cameras": self.cameras,
            "observation_keys": [*OPENPI_IMAGE_KEYS[: len(self.cameras)], "observation/state", "prompt"],
            "action_dim": self.safety.action_dim,
            "safety": self.safety.to_dict(),
            "max_message_bytes": self.max_message_bytes,
            "request_timeout_s": self.request_timeout_s,
        })
        meta.update(extra or {})
        return meta

    # --- HTTP side: health probe, authentication, client limit ---------------------------------
    def _process_request(self, connection, request):
        if request.path.split("?")[0] == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.api_key is not None:
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Api-Key {self.api_key}".encode()):
                log.warning("refused a client without the right API key")
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
        if self._clients >= self.max_clients:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "too many clients\n")
        return None

    # --- one client -------------------------------------------------------------------------------
    async def _handler(self, ws):
        from websockets.exceptions import ConnectionClosed

        self._clients += 1
        safety = SafetyFilter(self.safety)  # per client: remembers this robot's last gripper command
        prev_total_ms = None
        try:
            await ws.send(encode_message(self.metadata))
            while True:
                try:
                    data = await asyncio.wait_for(ws.recv(), self.idle_timeout_s)
                except asyncio.TimeoutError:
                    await ws.close(1000, "idle timeout")
                    return
                t_start = time.perf_counter()
                reply = await self._answer(data, safety, prev_total_ms)
                await ws.send(reply)
                prev_total_ms = (time.perf_counter() - t_start) * 1e3
        except ConnectionClosed:
            pass  # the client went away (or sent an oversized message): nothing else is affected
        finally:
            self._clients -= 1

    async def _answer(self, data, safety: SafetyFilter, prev_total_ms) -> bytes | str:
        self._stats["requests"] += 1
        t_recv = time.perf_counter()
        try:
            if isinstance(data, str):
                raise BadRequest("send observations as binary msgpack frames, not text")
            msg = decode_message(data)
            if msg.get("reset") is True and len(msg) == 1:
                await asyncio.get_running_loop().run_in_executor(self._executor, self.policy.reset)
                return encode_message({"reset": True})
            obs = to_policy_obs(msg, self.cameras)
        except BadRequest as e:
            self._stats["errors"] += 1
            return f"error: {e}"
        loop = asyncio.get_running_loop()
        timing = {}

        def infer():
            timing["queue_ms"] = (time.perf_counter() - t_recv) * 1e3
            t0 = time.perf_counter()
            try:
                return self.policy.act(obs)
            finally:
                timing["infer_ms"] = (time.perf_counter() - t0) * 1e3

        result, error = None, None
        try:
            result = await asyncio.wait_for(loop.run_in_executor(self._executor, infer), self.request_timeout_s)
        except asyncio.TimeoutError:
            error = f"request timed out after {self.request_timeout_s:.1f} s; sent a hold action"
        except EdgeVLAError as e:
            self._stats["errors"] += 1
            return f"error: {e}"  # the observation is unusable (wrong image shape, state size...)
        except Exception as e:  # a bug in the policy: log it here, tell the client one line
            log.exception("policy call failed")
            self._stats["errors"] += 1
            error = f"policy failed ({type(e).__name__}); sent a hold action"
        total_ms = (time.perf_counter() - t_recv) * 1e3
        if result is not None:
            outcome = safety.filter(result.action, latency_ms=total_ms)
        else:
            outcome = safety.hold(error)
        if outcome.error:
            self._stats["held"] += 1
        reply = {
            "actions": outcome.actions,
            "server_timing": {"infer_ms": timing.get("infer_ms"), "queue_ms": timing.get("queue_ms"),
                              "total_ms": total_ms, **({"prev_total_ms": prev_total_ms} if prev_total_ms else {})},
            "safety": outcome.to_dict(),
        }
        if result is not None:
            reply["policy_timing"] = {k: v for k, v in (result.timings or {}).items() if isinstance(v, (int, float))}
            reply["tokens"] = dict(result.tokens or {})
            if result.reasoning_text:
                reply["reasoning"] = result.reasoning_text
        if outcome.error:
            reply["error"] = outcome.error
        return encode_message(reply)

    # --- running ----------------------------------------------------------------------------------
    async def serve(self, on_ready=None) -> None:
        from websockets.asyncio.server import serve

        self._stop = asyncio.Event()
        async with serve(self._handler, self.host, self.port, process_request=self._process_request,
                         max_size=self.max_message_bytes, compression=None, ping_interval=20, ping_timeout=20) as srv:
            self.port = srv.sockets[0].getsockname()[1]
            log.info("serving on ws://%s:%d (healthz: http://%s:%d/healthz)", self.host, self.port, self.host, self.port)
            if on_ready:
                on_ready(self)
            await self._stop.wait()

    def serve_forever(self, on_ready=None) -> None:
        try:
            asyncio.run(self.serve(on_ready))
        except OSError as e:
            raise EdgeVLAError(f"cannot listen on {self.host}:{self.port} ({e.strerror or e})",
                               "pick another --port, or stop the process using it") from None

    def start(self) -> "PolicyServer":
        """Serve on a background thread (tests, in-process use); returns once listening."""
        def run():
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self.serve(lambda _: self._ready.set()))
            except BaseException as e:  # noqa: BLE001 - handed to the starting thread
                self._startup_error = e
                self._ready.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="policy-server", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._startup_error is not None:
            raise EdgeVLAError(f"the policy server did not start ({self._startup_error})")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def stats(self) -> dict:
        return dict(self._stats, clients=self._clients)
