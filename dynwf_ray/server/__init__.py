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

import logging
from typing import Any

from pydantic import ValidationError

from ..errors import InvalidInputError
from .app import create_app
from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve"]

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
        raise InvalidInputError(f"invalid server settings: {exc}") from None
    engine = Engine.start(**engine_options)
    try:
        if not engine.journal.list_tokens():
            print("dynwf serve: no API tokens yet; create one with `dynwf token create --admin`",
                  flush=True)
        print(f"dynwf serve: the API and dashboard on http://{host}:{port}/", flush=True)
        uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="warning")
    finally:
        engine.stop()
