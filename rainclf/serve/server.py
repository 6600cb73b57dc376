"""``serve(options)``: the export checked, then uvicorn until SIGTERM / SIGINT.

One worker runs the app in this process; ``--workers N`` binds the socket here and lets uvicorn's
supervisor spawn N processes that each build the app from $RAINCLF_SERVE_OPTIONS (and share
Prometheus numbers through a temporary $PROMETHEUS_MULTIPROC_DIR, removed at exit).

Shutdown (SIGTERM, or Ctrl-C): uvicorn stops accepting connections, lets the requests in flight
finish (at most ``graceful_timeout_s``), then the batcher stops; ``serve`` returns 0. It returns
1 when the model could not be loaded.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import tempfile

from rainclf.serve.config import ENV_OPTIONS, ServeOptions
from rainclf.serve.engine import open_export


def _log_config() -> dict:
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["rainclf.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def _uvicorn_config(app, options: ServeOptions, **kw):
    import uvicorn

    # graceful shutdown waits for open connections, and an idle keep-alive one only closes after
    # timeout_keep_alive: keep it short, or every SIGTERM would last that long
    return uvicorn.Config(app, host=options.host, port=options.port, log_config=_log_config(),
                          access_log=options.access_log, timeout_keep_alive=5, server_header=False,
                          timeout_graceful_shutdown=int(options.graceful_timeout_s + 0.999), **kw)


def serve(options: ServeOptions) -> int:
    """Serve ``options.model`` until a signal; ServeError (a ValueError) when it cannot be served."""
    open_export(options.model)      # one line naming the fix, before any port is taken
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"rainclf serve needs {e.name}: pip install 'rainclf[serve]'") from None
    # uvicorn re-raises the signal it shut down on once it is done; ignore that re-raise so a
    # graceful stop exits 0 (systemd and docker count that as a clean stop)
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _single(options) if options.workers == 1 else _workers(options)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _single(options: ServeOptions) -> int:
    import uvicorn

    from rainclf.serve.app import create_app

    failed: list[str] = []

    def on_fatal(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    server = uvicorn.Server(_uvicorn_config(create_app(options, on_fatal=on_fatal), options))
    server.run()
    return 1 if failed or not server.started else 0


def _workers(options: ServeOptions) -> int:
    from uvicorn.supervisors import Multiprocess

    metrics_dir = tempfile.mkdtemp(prefix="rainclf-serve-metrics-")
    saved = {k: os.environ.get(k) for k in (ENV_OPTIONS, "PROMETHEUS_MULTIPROC_DIR")}
    os.environ.update({ENV_OPTIONS: options.to_json(), "PROMETHEUS_MULTIPROC_DIR": metrics_dir})
    try:
        config = _uvicorn_config("rainclf.serve.app:app_from_env", options, factory=True,
                                 workers=options.workers)
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return 0
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        shutil.rmtree(metrics_dir, ignore_errors=True)
