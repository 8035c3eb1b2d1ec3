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

What one request may make the server allocate is bounded before the policy sees it: the message
size (`max_message_bytes`), msgpack containers (`MSGPACK_LIMITS`), array rank, every image side
(`max_image_side`, so the resize weights stay small), the cameras (the model's, no others), the
state's length and the prompt's length in the model's own tokens (what is left of the LM's
positions after the image prefix and the decode). A request over any bound is a bad request: one
text line back to that client, one line in the log.

SIGTERM/SIGINT (`serve_forever`) stop it gracefully: no new connections, the requests in flight
are answered (a request that arrives meanwhile gets a hold action), every connection is closed
with 1001 (going away), and one log line says so.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import logging
import signal
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
# msgpack's own limits default to the message length: an 8 MiB message of one-byte map entries
# would become millions of Python objects. An observation is a few small maps and short lists.
MSGPACK_LIMITS = dict(max_map_len=256, max_array_len=4096, max_ext_len=0)
MAX_ARRAY_DIMS = 4
MAX_STATE_VALUES = 1024
# No instruction needs more characters per token than this; longer strings are refused before
# they are tokenized (tokenizing megabytes would stall every client).
MAX_CHARS_PER_TOKEN = 16


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
        if len(shape) > MAX_ARRAY_DIMS or any(d < 0 for d in shape):
            raise BadRequest(f"array shape {shape} is not allowed (at most {MAX_ARRAY_DIMS} non-negative dims)")
        size = 1
        for d in shape:  # Python ints: a product of huge dims cannot wrap around to match the data
            size *= d
        data = obj.get(b"data", b"")
        if not isinstance(data, bytes) or len(data) != dtype.itemsize * size:
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
        msg = msgpack.unpackb(data, object_hook=_unpack_array, strict_map_key=False, **MSGPACK_LIMITS)
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


def to_policy_obs(msg: dict, cameras: list[str], max_image_side: int = 4096) -> dict:
    """openpi LIBERO keys (or native keys) -> the Policy's observation dict, refused (BadRequest)
    unless every image is a uint8 HxWx3 frame of a camera the model reads, 2..max_image_side px a side."""
    if "images" in msg:
        images = msg["images"]
        if not isinstance(images, dict):
            raise BadRequest("`images` must be a map camera -> uint8 HxWx3 array")
        unknown = [str(c) for c in images if c not in cameras]
        if unknown:
            raise BadRequest(f"unknown camera(s) {unknown[:4]}: this model reads {cameras}")
    else:
        present = [k for k in OPENPI_IMAGE_KEYS if k in msg]
        if not present:
            raise BadRequest(f"observation lacks images: send {', '.join(OPENPI_IMAGE_KEYS)} (uint8 HxWx3)")
        images = {cam: msg[key] for cam, key in zip(cameras, OPENPI_IMAGE_KEYS) if key in msg}
    missing = [c for c in cameras if c not in images]
    if missing:
        keys = dict(zip(cameras, OPENPI_IMAGE_KEYS))
        raise BadRequest(f"observation lacks the image of camera(s) {missing} (send {[keys.get(c, c) for c in missing]})")
    for cam, img in images.items():
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
            desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
            raise BadRequest(f"image for camera `{cam}` must be a uint8 HxWx3 array, got {desc}")
        h, w = img.shape[:2]
        if not (2 <= h <= max_image_side and 2 <= w <= max_image_side):
            raise BadRequest(f"image for camera `{cam}` is {h}x{w} px; this server takes 2 to {max_image_side} px a side")
    instruction = msg.get("prompt", msg.get("instruction"))
    if not isinstance(instruction, str) or not instruction.strip():
        raise BadRequest("observation lacks `prompt` (the task instruction, a non-empty string)")
    state = msg.get("observation/state", msg.get("state"))
    if state is not None:
        if isinstance(state, (list, tuple)) and len(state) > MAX_STATE_VALUES:
            raise BadRequest(f"`observation/state` has {len(state)} values (the robot state is a short vector)")
        try:
            state = np.asarray(state)
        except (TypeError, ValueError):
            raise BadRequest("`observation/state` must be a numeric array") from None
        if state.dtype.kind not in "biuf":
            raise BadRequest("`observation/state` must be a numeric array")
        if state.size > MAX_STATE_VALUES:
            raise BadRequest(f"`observation/state` has {state.size} values (the robot state is a short vector)")
    return {"images": dict(images), "state": state, "instruction": instruction}


def prompt_token_budget(policy) -> int | None:
    """How many prompt tokens `policy` can take: the LM's positions (max_position_embeddings) less
    the image/state prefix and the longest decode its mode may run. None when the config does not say.
    A longer prompt makes the exported decoder index past its rotary tables (ONNX Runtime's
    InvalidArgument) or a torch model run outside the positions it was trained on."""
    cfg = getattr(getattr(policy, "processor", None), "config", None)
    lm = getattr(cfg, "lm", None)
    max_pos = lm.get("max_position_embeddings") if isinstance(lm, dict) else None
    if not isinstance(max_pos, int) or max_pos <= 0:
        return None
    patch = (getattr(cfg, "vision", None) or {}).get("patch_size")
    per_cam = (cfg.image_size // patch // max(int(cfg.token_pool), 1)) ** 2 if isinstance(patch, int) and patch > 0 else 0
    prefix = per_cam * len(cfg.cameras) + (1 if cfg.use_proprio else 0)
    n_act = int(getattr(policy, "n_action_tokens", 0) or 0)
    direct = len(getattr(policy, "inference_prefix_ids", None) or []) + n_act
    full = (len(getattr(policy, "reasoning_prefix_ids", None) or []) + int(getattr(policy, "max_free_tokens", 0) or 0)
            + len(getattr(policy, "forced_action_ids", None) or []) + n_act)
    decode = direct if getattr(policy, "mode", "direct") == "direct" else max(direct, full)
    return max(max_pos - prefix - decode, 0)


class PolicyServer:
    """Serve one policy (anything with `act(obs)`, `reset()`, optional `metadata`) over websockets."""

    def __init__(self, policy, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 max_message_bytes: int = 8 << 20, request_timeout_s: float = 30.0, idle_timeout_s: float | None = 600.0,
                 max_clients: int = 64, safety: SafetyConfig | None = None, metadata: dict | None = None,
                 max_image_side: int = 4096, max_prompt_tokens: int | None = None):
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
        self.max_image_side = int(max_image_side)
        budget = prompt_token_budget(policy)
        self.max_prompt_tokens = min(x for x in (max_prompt_tokens, budget) if x is not None) \
            if (max_prompt_tokens, budget) != (None, None) else None
        self.metadata = self._metadata(metadata)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        self._clients = 0
        self._connections: set = set()
        self._inflight = 0
        self._drained: asyncio.Event | None = None
        self._closing = False
        self._logged_failures: set[str] = set()
        self._stats = {"requests": 0, "errors": 0, "held": 0, "refused": 0}
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
            "max_image_side": self.max_image_side,
            "max_prompt_tokens": self.max_prompt_tokens,
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
        self._connections.add(ws)
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
                self._inflight += 1
                try:
                    if self._closing:  # arrived during shutdown: the robot holds rather than waits
                        reply = self._hold_reply(safety, "the policy server is shutting down; sent a hold action")
                    else:
                        reply = await self._answer(data, safety, prev_total_ms, self._peer(ws))
                    await ws.send(reply)
                finally:
                    self._inflight -= 1
                    if self._inflight == 0 and self._drained is not None:
                        self._drained.set()
                prev_total_ms = (time.perf_counter() - t_start) * 1e3
        except ConnectionClosed:
            pass  # the client went away (or sent an oversized message): nothing else is affected
        finally:
            self._clients -= 1
            self._connections.discard(ws)

    @staticmethod
    def _peer(ws) -> str:
        addr = getattr(ws, "remote_address", None)
        return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else "a client"

    def _refuse(self, peer: str, reason: str) -> str:
        """A bad request: one line to that client, one line in the log."""
        self._stats["errors"] += 1
        self._stats["refused"] += 1
        log.warning("refused a request from %s: %s", peer, reason)
        return f"error: {reason}"

    def _hold_reply(self, safety: SafetyFilter, reason: str) -> bytes:
        self._stats["held"] += 1
        outcome = safety.hold(reason)
        return encode_message({"actions": outcome.actions, "server_timing": {}, "safety": outcome.to_dict(),
                               "error": outcome.error})

    def _check_prompt(self, instruction: str) -> None:
        """Refuse a prompt the model cannot take, counted in its own tokens, before the policy runs."""
        limit = self.max_prompt_tokens
        if limit is None:
            return
        if len(instruction) > MAX_CHARS_PER_TOKEN * max(limit, 1):
            raise BadRequest(f"prompt is {len(instruction)} characters; this model takes at most {limit} tokens")
        count = getattr(getattr(self.policy, "processor", None), "prompt_ids", None)
        n = len(count(instruction)) if count else len(instruction.split())
        if n > limit:
            raise BadRequest(f"prompt is {n} tokens; this model takes at most {limit} "
                             "(its positions less the image prefix and the decode)")

    async def _answer(self, data, safety: SafetyFilter, prev_total_ms, peer: str = "a client") -> bytes | str:
        self._stats["requests"] += 1
        t_recv = time.perf_counter()
        try:
            if isinstance(data, str):
                raise BadRequest("send observations as binary msgpack frames, not text")
            msg = decode_message(data)
            if msg.get("reset") is True and len(msg) == 1:
                await asyncio.get_running_loop().run_in_executor(self._executor, self.policy.reset)
                return encode_message({"reset": True})
            obs = to_policy_obs(msg, self.cameras, self.max_image_side)
            self._check_prompt(obs["instruction"])
        except BadRequest as e:
            return self._refuse(peer, str(e))
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
            return self._refuse(peer, str(e))  # the observation is unusable (state size, NaN state...)
        except Exception as e:  # a bug in the policy: the client gets a hold and one line
            kind = type(e).__name__
            # One traceback per kind of failure is enough to debug it; repeats are one line each.
            if kind not in self._logged_failures:
                self._logged_failures.add(kind)
                log.exception("policy call failed (%s); later failures of this kind are logged in one line", kind)
            else:
                log.error("policy call failed: %s: %s", kind, str(e).splitlines()[0][:200] if str(e) else "")
            self._stats["errors"] += 1
            error = f"policy failed ({kind}); sent a hold action"
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
    async def serve(self, on_ready=None, handle_signals: bool = False) -> None:
        from websockets.asyncio.server import serve

        self._stop = asyncio.Event()
        self._drained = asyncio.Event()
        self._closing = False
        stop_reason: list[str] = []
        loop = asyncio.get_running_loop()
        if handle_signals:
            def on_signal(sig):
                if stop_reason:  # a second signal: stop waiting for the requests in flight
                    self._drained.set()
                    return
                stop_reason.append(sig.name)
                self._stop.set()

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal, sig)
        async with serve(self._handler, self.host, self.port, process_request=self._process_request,
                         max_size=self.max_message_bytes, compression=None, ping_interval=20, ping_timeout=20) as srv:
            self.port = srv.sockets[0].getsockname()[1]
            log.info("serving on ws://%s:%d (healthz: http://%s:%d/healthz)", self.host, self.port, self.host, self.port)
            if on_ready:
                on_ready(self)
            await self._stop.wait()
            await self._shutdown(srv, stop_reason[0] if stop_reason else "stop()")
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _shutdown(self, srv, why: str) -> None:
        """No new connections; answer the requests in flight (each is bounded by the request timeout,
        after which it is answered with a hold); close every connection with 1001 (going away)."""
        self._closing = True
        srv.server.close()  # stop accepting; open connections stay until their requests are answered
        in_flight = self._inflight
        if self._inflight:
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), self.request_timeout_s + 5.0)
            except asyncio.TimeoutError:
                pass
        connections = list(self._connections)
        await asyncio.gather(*(ws.close(1001, "policy server shutting down") for ws in connections),
                             return_exceptions=True)
        log.info("stopped (%s): answered %d request(s) in flight, closed %d connection(s) with 1001 going away",
                 why, in_flight - self._inflight, len(connections))

    def serve_forever(self, on_ready=None) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully (see the module docstring)."""
        try:
            asyncio.run(self.serve(on_ready, handle_signals=True))
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
