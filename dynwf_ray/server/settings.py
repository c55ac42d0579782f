"""`ServerSettings`: how `dynwf serve` serves (address, limits, the trace link template)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .limits import CODE_LIMIT


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8750, ge=0, le=65535)
    #: Largest pushed code archive, in bytes.
    code_limit: int = Field(default=CODE_LIMIT, ge=1024)
    #: Link of an instance's trace in the tenant's tracing backend, e.g.
    #: "http://jaeger:16686/trace/{trace_id}"; may also use {tenant}. None: no link.
    trace_url: str | None = None

    @field_validator("trace_url")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            v.format(trace_id="0" * 32, tenant="t")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"trace_url {v!r} may use only the placeholders {{trace_id}} and {{tenant}} ({exc})"
            ) from None
        return v
