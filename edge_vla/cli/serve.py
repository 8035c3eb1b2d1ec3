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
              help="Require `Authorization: Api-Key KEY` (openpi's client sends it). Prefer the environment "
                   "variable EDGE_VLA_API_KEY: a key given on the command line is visible to every user in `ps`.")
@click.option("--max-message-mb", default=8.0, show_default=True, type=float, help="Largest accepted message.")
@click.option("--request-timeout", default=30.0, show_default=True, type=float,
              help="Seconds per request before the reply is a hold action with an error.")
@click.option("--max-clients", default=64, show_default=True, type=int)
@click.option("--max-image-side", default=4096, show_default=True, type=click.IntRange(2, 16384),
              help="Largest accepted image side in pixels (bounds what a request makes the server allocate).")
@click.option("--clip-low", default=None, help="Action lower limits: one number or 7 comma-separated (default -1).")
@click.option("--clip-high", default=None, help="Action upper limits: one number or 7 comma-separated (default 1).")
@click.option("--deadline-ms", default=None, type=float, help="Latency watchdog: flag replies slower than this.")
def serve(bundle, host, port, backend, mode, api_key, max_message_mb, request_timeout, max_clients, max_image_side,
          clip_low, clip_high, deadline_ms):
    """Serve a bundle or checkpoint over websockets with openpi's policy protocol
    (openpi_client.websocket_client_policy.WebsocketClientPolicy works unchanged); GET /healthz for probes.
    SIGTERM/SIGINT stop it gracefully: requests in flight are answered, connections close with 1001."""
    import logging
    from pathlib import Path

    from click.core import ParameterSource

    from edge_vla.runtime.policy import load_policy
    from edge_vla.runtime.safety import SafetyConfig
    from edge_vla.runtime.server import PolicyServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    safety = SafetyConfig.from_options(low=_floats(clip_low), high=_floats(clip_high), deadline_ms=deadline_ms)
    policy = load_policy(bundle, backend=backend, mode=mode)
    server = PolicyServer(policy, host=host, port=port, api_key=api_key, max_message_bytes=int(max_message_mb * 2**20),
                          request_timeout_s=request_timeout, max_clients=max_clients, safety=safety,
                          max_image_side=max_image_side,
                          # the artefact's name only: where it lives on this machine is no client's business
                          metadata={"policy": Path(bundle).resolve().name})
    if api_key and click.get_current_context().get_parameter_source("api_key") == ParameterSource.COMMANDLINE:
        click.secho("warning: --api-key on the command line is visible to every user in `ps`; "
                    "set EDGE_VLA_API_KEY instead", fg="yellow", err=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.secho(f"warning: serving on {host} without --api-key: anyone who reaches this port can drive the robot",
                    fg="yellow", err=True)
    server.serve_forever(on_ready=lambda s: click.echo(f"serving {bundle} ({policy.mode}) on ws://{s.host}:{s.port} "
                                                       f"- health: http://{s.host}:{s.port}/healthz"))
