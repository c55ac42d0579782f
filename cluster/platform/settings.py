"""The platform's engine settings, in one place.

Every process that joins the engine (`engine.py` in its Ray job, `webhook.py`, your
own) starts it with these, because a process joins a running engine only when its
whole configuration is the same, field by field (cluster/README.md, "Several
platform processes and one engine").
"""

import os


def engine_options() -> dict:
    return {
        "database_url": os.environ["DYNWF_DATABASE_URL"],
        "ray_address": "auto",  # the cluster this node belongs to (RAY_ADDRESS in a Ray job)
        "detached": True,  # the engine outlives the process that started it
        # Explicit, so that processes with different OTEL_* variables still agree.
        # Put the OTLP settings here ({"OTEL_EXPORTER_OTLP_ENDPOINT": ...}) to trace.
        "telemetry_env": {},
    }
