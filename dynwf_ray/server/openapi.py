"""Print the API's OpenAPI document (docs/openapi.json is this output):
`python -m dynwf_ray.server.openapi > docs/openapi.json`. No engine is needed."""

from __future__ import annotations

import json

from .app import create_app


def document() -> dict:
    return create_app(engine=None).openapi()  # type: ignore[arg-type] - routes are not called


if __name__ == "__main__":
    print(json.dumps(document(), indent=2, sort_keys=True))
