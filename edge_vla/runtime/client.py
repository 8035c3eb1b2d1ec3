"""The robot side of the policy server: `RemotePolicy` looks like a local Policy (`act(obs)` ->
ActionResult, `reset()`, `metadata`), so the hardware loop runs the same code in-process or
against a server. It speaks the same wire protocol as openpi's WebsocketClientPolicy (which
also works against our server unchanged) and adds what a robot needs: a reply timeout and a
clear `ServerLost` error when the server goes away, so the loop can hold the robot.
"""

from __future__ import annotations

import time

import numpy as np

from edge_vla.errors import EdgeVLAError
from edge_vla.runtime.server import OPENPI_IMAGE_KEYS, decode_message, encode_message


class ServerLost(EdgeVLAError):
    """The server closed, vanished or did not answer in time."""


def _why_closed(e: Exception) -> str:
    """`1001 going away: policy server shutting down` for a server that stopped on purpose."""
    rcvd = getattr(e, "rcvd", None)
    if rcvd is not None:
        return f"closed {rcvd.code}" + (f": {rcvd.reason}" if rcvd.reason else "")
    return type(e).__name__


def to_openpi_obs(obs: dict, cameras) -> dict:
    """Our observation dict -> openpi's LIBERO keys (images in `cameras` order)."""
    images = obs["images"]
    msg = {key: np.ascontiguousarray(images[cam]) for cam, key in zip(cameras, OPENPI_IMAGE_KEYS) if cam in images}
    if obs.get("state") is not None:
        msg["observation/state"] = np.asarray(obs["state"], dtype=np.float32)
    msg["prompt"] = obs["instruction"]
    return msg


class RemotePolicy:
    def __init__(self, uri: str, api_key: str | None = None, timeout_s: float = 30.0, open_timeout_s: float = 10.0):
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        self.uri = uri if uri.startswith("ws") else f"ws://{uri}"
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        try:
            kw = dict(additional_headers=headers, compression=None, max_size=None, open_timeout=open_timeout_s)
            try:  # websockets >= 17.1 wants legacy=True for a connection held outside a `with` block
                self._ws = connect(self.uri, legacy=True, **kw)
            except TypeError:
                self._ws = connect(self.uri, **kw)
            self.metadata = decode_message(self._ws.recv(timeout=open_timeout_s))
        except InvalidStatus as e:
            code = e.response.status_code
            why = {401: "the server wants an API key (--api-key)", 503: "the server has too many clients"}.get(code, "")
            raise EdgeVLAError(f"policy server at {self.uri} refused the connection (HTTP {code})", why or None) from None
        except (OSError, TimeoutError) as e:
            raise ServerLost(f"cannot reach the policy server at {self.uri} ({e})",
                             "start it with `edge-vla serve BUNDLE` and check host/port") from None
        self.cameras = list(self.metadata.get("cameras") or ("agentview", "wrist"))
        self.mode = self.metadata.get("mode")

    def act(self, obs: dict):
        from websockets.exceptions import ConnectionClosed

        from edge_vla.runtime.policy import ActionResult

        t0 = time.perf_counter()
        try:
            self._ws.send(encode_message(to_openpi_obs(obs, self.cameras)))
            reply = self._ws.recv(timeout=self.timeout_s)
        except TimeoutError:
            raise ServerLost(f"the policy server did not answer within {self.timeout_s:.0f} s") from None
        except (ConnectionClosed, OSError) as e:
            raise ServerLost(f"lost the policy server at {self.uri} ({_why_closed(e)})") from None
        if isinstance(reply, str):
            raise EdgeVLAError(f"policy server: {reply.removeprefix('error: ')}")
        msg = decode_message(reply)
        actions = np.asarray(msg["actions"], dtype=np.float32)
        timings = {k: v for k, v in (msg.get("policy_timing") or {}).items()}
        timings["server"] = msg.get("server_timing", {})
        timings["round_trip"] = (time.perf_counter() - t0) * 1e3
        info = {"safety": msg.get("safety", {}), "remote": True}
        if msg.get("error"):
            info["error"] = msg["error"]
        return ActionResult(action=actions[0] if actions.shape[0] == 1 else actions,
                            reasoning_text=msg.get("reasoning"), timings=timings, tokens=dict(msg.get("tokens") or {}),
                            info=info)

    def reset(self) -> None:
        """openpi's client does nothing here; ours also resets the server-side policy."""
        from websockets.exceptions import ConnectionClosed

        try:
            self._ws.send(encode_message({"reset": True}))
            self._ws.recv(timeout=self.timeout_s)
        except (TimeoutError, ConnectionClosed, OSError) as e:
            raise ServerLost(f"lost the policy server at {self.uri} ({_why_closed(e)})") from None

    def close(self) -> None:
        self._ws.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
