"""Fuzzing the HTTP API from its own OpenAPI document (schemathesis): for every operation,
generated requests, valid and not, never get a 5xx, and every response matches the
document (status code, content type, body schema).

Half the generated cases address a real tenant with instances (the other half
random ones), so the routes get past the tenant check too."""

from __future__ import annotations

import time
import uuid

import pytest
import schemathesis
from schemathesis import checks
from hypothesis import HealthCheck, given, settings

from dynwf_ray.server import create_app

from .workflows import Hello

#: Examples per operation: enough to reach every branch of the input checks while keeping
#: the run to about a minute per backend.
EXAMPLES = 30


@pytest.fixture
def fuzzed(engine):
    tenant = f"fz{uuid.uuid4().hex[:10]}"
    engine.register(tenant, Hello)
    binding = engine.binding(tenant)
    for i in range(3):
        binding.create(id=f"i{i}")
    token = engine.journal.create_token(None, "fuzz", time.time())[1]
    return {"app": create_app(engine), "tenant": tenant, "token": token}


def test_no_5xx_and_every_response_matches_the_document(fuzzed):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed["app"])
    headers = {"Authorization": f"Bearer {fuzzed['token']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    failures = []
    for operation in operations:
        # Valid bytes for the schema are not a valid code archive: only this route's
        # refusals of schema-valid input are expected (a 400 naming what is wrong).
        excluded = [checks.positive_data_acceptance] if operation.path.endswith("/code") else []

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            params = case.path_parameters or {}
            if "tenant" in params and hash(str(params)) % 2 == 0:
                params["tenant"] = fuzzed["tenant"]
                if "id" in params and hash(params["id"]) % 2 == 0:
                    params["id"] = "i1"
            case.call_and_validate(headers=headers, excluded_checks=excluded)

        try:
            fuzz()
        except Exception as exc:  # noqa: BLE001 - collected, reported together below
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
