"""Run the app with uvicorn: in the foreground (`serve`) or in a background thread (`BackgroundServer`)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import warnings
from dataclasses import dataclass

from reattention_core.app.serving.app import AppConfig, create_app
from reattention_core.app.serving.worker import Backend
from reattention_core.engine import ReAttentionEngine
from reattention_core.errors import InvalidInputError

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServeConfig:
    """Where to listen.

    Args:
        host: interface address; loopback by default, so only this machine can reach the model.
        port: TCP port (0 picks a free one; `BackgroundServer.port` says which).
        log_level: uvicorn's log level.
    """

    host: str = LOOPBACK
    port: int = 8000
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise InvalidInputError(f"port must be an int in [0, 65535], got {self.port!r}")

    def check_exposure(self) -> None:
        """Warn when the server listens beyond loopback: nothing but an optional API key guards it."""
        if not is_loopback(self.host):
            warnings.warn(
                f"serving on {self.host}: any machine that can reach this address can use the model. "
                "Pass --api-key, or keep the default host 127.0.0.1 and put a proxy in front.",
                stacklevel=2,
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _uvicorn_server(
    engine: ReAttentionEngine, serve: ServeConfig, app_config: AppConfig | None, backend: Backend | None = None
):
    import uvicorn

    serve.check_exposure()
    app = create_app(engine, app_config, backend=backend)
    return uvicorn.Server(uvicorn.Config(app, host=serve.host, port=serve.port, log_level=serve.log_level))


def serve(
    engine: ReAttentionEngine,
    serve: ServeConfig | None = None,
    app_config: AppConfig | None = None,
    *,
    backend: Backend | None = None,
) -> None:
    """Serve ``engine`` until interrupted (Ctrl-C stops after the running generation's next piece).

    ``backend``: see `GenerationWorker` (the `ShardedEngine` on rank 0 of a sharded deployment).
    """
    _uvicorn_server(engine, serve or ServeConfig(), app_config, backend).run()


class BackgroundServer:
    """The server in a daemon thread, for notebooks and tests::

        with BackgroundServer(engine) as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="x")

    Args: as `serve`; the port defaults to a free one.
    """

    def __init__(
        self,
        engine: ReAttentionEngine,
        serve: ServeConfig | None = None,
        app_config: AppConfig | None = None,
        *,
        backend: Backend | None = None,
    ) -> None:
        serve = serve or ServeConfig(port=0, log_level="warning")
        if serve.port == 0:
            serve = ServeConfig(host=serve.host, port=_free_port(serve.host), log_level=serve.log_level)
        self.config = serve
        self._server = _uvicorn_server(engine, serve, app_config, backend)
        self._thread = threading.Thread(target=self._server.run, name="reattention-serve", daemon=True)

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``, what OpenAI clients take as ``base_url``."""
        return f"http://{self.config.host}:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.config.host}:{self.port}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
