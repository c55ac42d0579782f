"""Who is calling: bearer tokens, what each reaches, and signed webhooks.

A token is created with the CLI (`dynwf token create`) and stored only as its
SHA-256 in the journal. An admin token reaches every tenant and the admin-only
routes (pushing code); a tenant token reaches that tenant only, and anything of
another tenant answers exactly as an unknown one would (404), so a token cannot
even learn which other tenants or ids exist. A missing, malformed, unknown or
revoked token is a 401.

Webhooks carry no token: the body is signed with the tenant's webhook secret
(HMAC-SHA256, hex, in `X-Dynwf-Signature-256: sha256=<hex>`, or under the header
name code hosts' push hooks use, `X-Hub-Signature-256`, in the same form); any
mismatch, or a tenant without a secret, is the same 401."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request

from ..errors import InstanceNotFoundError, InvalidInputError, UnknownTenantError
from ..types import validate_id
from .errors import ApiError, unauthorized

SIGNATURE_HEADER = "X-Dynwf-Signature-256"
#: The names a code host's push hooks use for the same signature and delivery id: a
#: hook pointed straight at the webhook URL works without a relay.
HUB_SIGNATURE_HEADER = "X-Hub-Signature-256"
HUB_DELIVERY_HEADER = "X-GitHub-Delivery"


@dataclass(frozen=True)
class Caller:
    """The holder of a valid token: an admin (tenant None) or one tenant."""

    token_id: str
    tenant: str | None

    @property
    def admin(self) -> bool:
        return self.tenant is None

    def tenant_scope(self, tenant: str) -> str:
        """`tenant`, validated, if this caller reaches it; else 404 as for an unknown tenant."""
        validate_id(tenant, "tenant id")
        if not self.admin and tenant != self.tenant:
            raise UnknownTenantError(f"no tenant {tenant!r}")
        return tenant

    def instance_scope(self, tenant: str, instance_id: str) -> tuple[str, str]:
        """(tenant, id), validated, if this caller reaches them; else the very 404 an
        unknown id of a reachable tenant gives (the journal's message)."""
        validate_id(tenant, "tenant id")
        validate_id(instance_id)
        if not self.admin and tenant != self.tenant:
            raise InstanceNotFoundError(f"no instance {instance_id!r} for tenant {tenant!r}")
        return tenant, instance_id

    def require_admin(self) -> None:
        if not self.admin:
            raise ApiError(403, "Forbidden", "this needs an admin token")


def caller(request: Request) -> Caller:
    """The FastAPI dependency of every authenticated route."""
    header = request.headers.get("authorization")
    if not header:
        raise unauthorized("no token: send 'Authorization: Bearer <token>'")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 200:
        raise unauthorized("the Authorization header must be 'Bearer <token>'")
    info = request.app.state.engine.journal.find_token(token)
    if info is None:
        raise unauthorized("the token is not valid (unknown or revoked)")
    return Caller(info.token_id, info.tenant_id)


def check_signature(secret: str | None, body: bytes, header: str | None) -> None:
    """Raise the 401 unless `header` is `sha256=<hex HMAC-SHA256 of body under secret>`."""
    if secret is None or not header or not header.startswith("sha256="):
        raise unauthorized(f"a valid {SIGNATURE_HEADER} header is required")
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, header.removeprefix("sha256=").strip().lower()):
        raise unauthorized(f"a valid {SIGNATURE_HEADER} header is required")


def delivery_id(header: str | None) -> str | None:
    """The instance id a webhook delivery maps to (`wh-<delivery>`), so a redelivery
    creates nothing new; None without the header."""
    if header is None or not header.strip():
        return None  # none given: the instance gets a new id
    try:
        return validate_id(f"wh-{header.strip()}", "X-Dynwf-Delivery")
    except InvalidInputError as exc:
        raise InvalidInputError(str(exc).replace("'wh-", "'", 1)) from None
