"""`dynwf serve`: the HTTP API and the web dashboard in front of one engine.

- `app.py`: the routes (tenants and code, instances, lifecycle, steps, logs, stats,
  webhooks) and `create_app(engine, settings)`;
- `auth.py`: bearer tokens and what each reaches; signed webhooks;
- `errors.py`: every error as `{"error": {"name", "message"}}` with its status;
- `limits.py`: body size limits and content types, enforced before a body is read whole;
- `models.py`: the request and response bodies (the OpenAPI document's schemas);
- `archive.py`: unpacking a pushed code archive safely;
- `settings.py`: `ServerSettings`;
- `static/`: the dashboard (plain HTML, JS and CSS, nothing fetched from elsewhere).

The API is documented in docs/http-api.md, its OpenAPI document in docs/openapi.json.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Iterator

from pydantic import ValidationError

from ..errors import invalid
from .app import create_app
from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve", "serving"]

log = logging.getLogger("dynwf_ray.server")


def serve(*, host: str = "127.0.0.1", port: int = 8750, trace_url: str | None = None,
          code_limit: int | None = None, **engine_options: Any) -> None:
    """Start an engine (`Engine.start(**engine_options)`) and serve it until interrupted;
    the engine stops with the server."""
    import uvicorn

    from ..engine import Engine

    try:
        settings = ServerSettings(host=host, port=port, trace_url=trace_url,
                                  **({"code_limit": code_limit} if code_limit else {}))
    except ValidationError as exc:
        raise invalid("invalid server settings", exc) from None
    engine = Engine.start(**engine_options)
    try:
        if not engine.journal.list_tokens():
            print("dynwf serve: no API tokens yet; create one with `dynwf token create --admin`",
                  flush=True)
        uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="warning")
    finally:
        engine.stop()


@contextlib.contextmanager
def serving(app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` with uvicorn in a background thread of this process (a platform that
    embeds the API next to its own code, tests, scripts); yields the base URL
    (`http://host:port`, port 0: a free one) once the server listens, and stops it on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="dynwf-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start within {timeout:g} s (see its log)")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
