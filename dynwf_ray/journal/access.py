"""Who may use the HTTP API: bearer tokens (table `api_tokens`) and the secrets tenants'
webhooks are signed with (table `webhook_secrets`).

A token is `dwf_` + 32 random bytes (URL-safe base64), handed out once by
`create_token`; the journal keeps only its SHA-256 (hex, uniquely indexed), so
`find_token` looks a presented secret up by its hash, and nothing read from the
journal can be used as a token. Each token has a short public `token_id` (to list
and revoke it), a name, and a tenant (None: an admin token). Revoking is for good.
A webhook secret is kept as it is: checking an HMAC needs it.

A part of `Journal` (see the package docstring): its methods use the journal's
connection (`self._write()`, `self._read()`)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import asdict

from sqlalchemy import delete, insert, select, update

from ..errors import InvalidInputError
from ..types import validate_id
from .faults import retried
from .schema import A, W, TokenInfo

TOKEN_PREFIX = "dwf_"
MAX_TOKEN_NAME = 100
MAX_WEBHOOK_SECRET = 256

_TOKEN_COLS = [getattr(A.c, f) for f in TokenInfo.__dataclass_fields__]


class UnknownTokenError(InvalidInputError, LookupError):
    """No API token has this id."""


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Access:
    @retried
    def create_token(self, tenant_id: str | None, name: str, now: float) -> tuple[TokenInfo, str]:
        """A new token for a tenant (None: an admin token): its info, and its secret, which
        is not stored and cannot be had again."""
        if tenant_id is not None:
            validate_id(tenant_id, "tenant id")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_TOKEN_NAME:
            raise InvalidInputError(
                f"token name {str(name)[:120]!r} is invalid: 1-{MAX_TOKEN_NAME} characters"
            )
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._write() as conn:
            while True:  # 40 random bits: a repeat is rare, and the primary key catches a race
                token_id = secrets.token_hex(5)
                if conn.execute(select(A.c.token_id).where(A.c.token_id == token_id)).first() is None:
                    break
            info = TokenInfo(token_id, tenant_id, name, now, None)
            conn.execute(insert(A).values(token_hash=token_hash(secret), **asdict(info)))
        return info, secret

    def find_token(self, secret: str) -> TokenInfo | None:
        """The token whose secret this is; None when it is unknown or revoked."""
        if not isinstance(secret, str) or not secret.startswith(TOKEN_PREFIX):
            return None
        with self._read() as conn:
            row = conn.execute(
                select(*_TOKEN_COLS).where(A.c.token_hash == token_hash(secret), A.c.revoked_at.is_(None))
            ).first()
        return TokenInfo(*row) if row else None

    @retried
    def revoke_token(self, token_id: str, now: float) -> TokenInfo:
        """Revoke a token for good (again: nothing changes); UnknownTokenError if none has this id."""
        with self._write() as conn:
            conn.execute(update(A).where(A.c.token_id == token_id, A.c.revoked_at.is_(None))
                         .values(revoked_at=now))
            row = conn.execute(select(*_TOKEN_COLS).where(A.c.token_id == token_id)).first()
            if row is None:
                raise UnknownTokenError(f"no API token with id {token_id!r}")
        return TokenInfo(*row)

    def list_tokens(self, tenant_id: str | None = None) -> list[TokenInfo]:
        """Every token (revoked ones too), or a tenant's, oldest first."""
        stmt = select(*_TOKEN_COLS).order_by(A.c.created_at, A.c.token_id)
        if tenant_id is not None:
            stmt = stmt.where(A.c.tenant_id == validate_id(tenant_id, "tenant id"))
        with self._read() as conn:
            return [TokenInfo(*r) for r in conn.execute(stmt).all()]

    @retried
    def set_webhook_secret(self, tenant_id: str, secret: str | None, now: float) -> None:
        """Set the secret a tenant's webhooks are signed with (None: webhooks are refused)."""
        validate_id(tenant_id, "tenant id")
        if secret is not None and (not isinstance(secret, str) or not secret
                                   or len(secret) > MAX_WEBHOOK_SECRET):
            raise InvalidInputError(
                f"webhook secret of tenant {tenant_id!r} must be 1-{MAX_WEBHOOK_SECRET} characters"
            )
        with self._write() as conn:
            conn.execute(delete(W).where(W.c.tenant_id == tenant_id))
            if secret is not None:
                conn.execute(insert(W).values(tenant_id=tenant_id, secret=secret, updated_at=now))

    def webhook_secret(self, tenant_id: str) -> str | None:
        with self._read() as conn:
            return conn.execute(select(W.c.secret).where(W.c.tenant_id == tenant_id)).scalar()
