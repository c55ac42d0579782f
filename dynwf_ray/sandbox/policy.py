"""What a tenant's sandboxes may do: the platform's policy, per tenant, with defaults.

The platform sets engine-wide defaults (`EngineConfig.sandbox_limits`) and
per-tenant overrides (`engine.set_tenant_policy`), stored in the journal. A
tenant's own `dynwf.toml` can ask for nothing here: only the platform grants.

- `SandboxLimits`: resource caps. Exceeding one ends the step attempt (or the
  activation, outside a step) with `ResourceLimitError` naming the limit and its
  value; the step's retry policy decides what follows.
- `TenantPolicy`: the limits plus what is granted beyond the default nothing:
  outbound connections to `host:port` pairs through the trusted egress proxy,
  extra filesystem paths (read-only or read-write), and the plain values and
  secrets tenant code finds in `self.env`.
- `JailSpec`: what one sandbox process is built with (data only: it crosses
  to the template process as JSON).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_HOST_PORT = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?:\d{1,5}$")


class SandboxLimits(BaseModel):
    """Resource caps of one tenant's sandboxes."""

    # Finite and bounded (a kernel limit must fit its C type; infinity has no JSON).
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    #: Address space of a sandbox process, in MiB (at most 1 TiB).
    memory_mb: int = Field(default=1024, ge=64, le=1 << 20)
    #: CPU seconds one step attempt may use; also bounds `run()` between two steps (at
    #: most a day).
    cpu_seconds: float = Field(default=60.0, gt=0, le=86_400)
    #: Processes and threads a sandbox may have at once (itself included).
    processes: int = Field(default=32, ge=4, le=1 << 20)
    #: Open file descriptors per sandbox process.
    open_files: int = Field(default=256, ge=32, le=1 << 20)
    #: Largest file a sandbox may write, in MiB (at most 1 TiB).
    file_size_mb: int = Field(default=64, ge=1, le=1 << 20)
    #: Size of the sandbox's scratch directory (its only writable place), in MiB.
    scratch_mb: int = Field(default=64, ge=1, le=1 << 20)
    #: What one activation may print or log, in KiB (more ends the attempt; at most 1 GiB).
    log_kib: int = Field(default=1024, ge=1, le=1 << 20)


class TenantPolicy(BaseModel):
    """What the platform grants one tenant's code; everything else is denied."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: `host:port` pairs (a leading `*.` matches subdomains) the tenant may reach
    #: through the egress proxy; empty means no network at all.
    egress: tuple[str, ...] = ()
    #: Resource caps; None means the engine's defaults.
    limits: SandboxLimits | None = None
    #: Extra paths the platform lends the tenant: path -> "ro" or "rw".
    paths: dict[str, Literal["ro", "rw"]] = Field(default_factory=dict)
    #: Whether the tenant's `dynwf.toml` may ask for pip packages (installed as binary
    #: wheels from the package index into its hosts' runtime env).
    pip: bool = False
    #: Plain values tenant code reads as `self.env[name]`.
    env: dict[str, str] = Field(default_factory=dict)
    #: Secret values, read the same way; their text is replaced by "[secret]" in
    #: captured logs, span attributes and error messages, and `masked()` hides them.
    secrets: dict[str, str] = Field(default_factory=dict)
    #: Activations of this tenant at once, at most (None: its fair share of the engine's
    #: `max_activations`, whatever other tenants leave unused).
    max_concurrency: int | None = Field(default=None, ge=1)

    @field_validator("env", "secrets")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not _ENV_NAME.match(name) or name == "WORKFLOWS":
                raise ValueError(f"env name {name!r} must match {_ENV_NAME.pattern} (not WORKFLOWS)")
        return v

    def masked(self) -> "TenantPolicy":
        """This policy with every secret's value replaced by "***" (for showing it)."""
        return self.model_copy(update={"secrets": {k: "***" for k in self.secrets}})

    @field_validator("egress")
    @classmethod
    def _egress(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            if not _HOST_PORT.match(item) or not 0 < int(item.rsplit(":", 1)[1]) < 65536:
                raise ValueError(f"egress entry {item!r} must be 'host:port' (port 1-65535)")
        return tuple(v)

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: dict[str, str]) -> dict[str, str]:
        for path in v:
            if not path.startswith("/"):
                raise ValueError(f"path {path!r} must be absolute")
        return v


class JailSpec(BaseModel):
    """How one sandbox process is confined (built by the host, applied in the child)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: "strict": every kernel mechanism, refuse to start without one; "process": a
    #: separate process with a clean environment and rlimits only.
    mode: Literal["strict", "process"] = "strict"
    #: Paths the sandbox may read (and execute), beyond the Python runtime's own.
    read_only: tuple[str, ...] = ()
    #: Paths it may read and write; the first is its scratch directory (cwd, $TMPDIR, $HOME).
    read_write: tuple[str, ...] = ()
    limits: SandboxLimits = Field(default_factory=SandboxLimits)
    #: Port the in-sandbox egress forwarder listens on (127.0.0.1, inside the sandbox's
    #: own network namespace); None: no network at all.
    egress_port: int | None = None
