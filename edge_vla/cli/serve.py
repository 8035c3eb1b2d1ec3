import click


def _floats(value):
    if value is None:
        return None
    try:
        return [float(x) for x in str(value).split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or a comma-separated list of numbers") from None


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Loopback by default; use 0.0.0.0 to accept other machines (set --api-key).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--backend", default="auto", show_default=True, help="auto | torch | onnxruntime | tensorrt")
@click.option("--mode", default=None, help="Decode mode: full | direct | adaptive (default: the recipe's).")
@click.option("--api-key", envvar="EDGE_VLA_API_KEY", default=None,
              help="Require `Authorization: Api-Key KEY` (openpi's client sends it). Env: EDGE_VLA_API_KEY.")
@click.option("--max-message-mb", default=8.0, show_default=True, type=float, help="Largest accepted message.")
@click.option("--request-timeout", default=30.0, show_default=True, type=float,
              help="Seconds per request before the reply is a hold action with an error.")
@click.option("--max-clients", default=64, show_default=True, type=int)
@click.option("--clip-low", default=None, help="Action lower limits: one number or 7 comma-separated (default -1).")
@click.option("--clip-high", default=None, help="Action upper limits: one number or 7 comma-separated (default 1).")
@click.option("--deadline-ms", default=None, type=float, help="Latency watchdog: flag replies slower than this.")
def serve(bundle, host, port, backend, mode, api_key, max_message_mb, request_timeout, max_clients, clip_low,
          clip_high, deadline_ms):
    """Serve a bundle or checkpoint over websockets with openpi's policy protocol
    (openpi_client.websocket_client_policy.WebsocketClientPolicy works unchanged); GET /healthz for probes."""
    import logging

    from edge_vla.runtime.policy import load_policy
    from edge_vla.runtime.safety import SafetyConfig
    from edge_vla.runtime.server import PolicyServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    safety = SafetyConfig.from_options(low=_floats(clip_low), high=_floats(clip_high), deadline_ms=deadline_ms)
    policy = load_policy(bundle, backend=backend, mode=mode)
    server = PolicyServer(policy, host=host, port=port, api_key=api_key, max_message_bytes=int(max_message_mb * 2**20),
                          request_timeout_s=request_timeout, max_clients=max_clients, safety=safety,
                          metadata={"policy": str(bundle)})
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.secho(f"warning: serving on {host} without --api-key: anyone who reaches this port can drive the robot",
                    fg="yellow", err=True)
    server.serve_forever(on_ready=lambda s: click.echo(f"serving {bundle} ({policy.mode}) on ws://{s.host}:{s.port} "
                                                       f"- health: http://{s.host}:{s.port}/healthz"))
