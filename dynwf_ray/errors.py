"""Every exception dynwf-ray raises on purpose, in one place.

Tenant code sees `NonRetryableError` (raise it to stop a step's retries),
`StepFailedError` (a step that used up its retries) and `WorkflowTimeoutError`
(a `wait_for_event` that timed out). Platform code sees the input errors
(`InvalidInputError` and its kinds `PayloadTooLargeError`, `NotSerializableError`),
`InstanceNotFoundError`, `DuplicateInstanceError`, `UnknownTenantError`,
`InvalidStateError`, `SandboxUnavailableError` and `JournalUnavailableError`
(the journal database cannot be used now: disk full, unreachable, read-only).
A step attempt that goes over a sandbox limit fails with `ResourceLimitError`; an
instance whose `run()` failed and whose rollback then failed too ends with
`RollbackFailedError`. Each message names the thing that was wrong.
"""

from __future__ import annotations


class DynwfError(Exception):
    """Base class of every error raised by dynwf-ray."""


class InvalidInputError(DynwfError, ValueError):
    """An argument failed validation (bad id, bad name, bad duration...)."""


class PayloadTooLargeError(InvalidInputError):
    """A value is larger than the journal accepts (params, results, events)."""


class NotSerializableError(InvalidInputError):
    """A value cannot be stored as JSON."""


class InstanceNotFoundError(DynwfError, LookupError):
    """No instance with this id exists for this tenant.

    Raised the same way whether the id is unknown or belongs to another
    tenant, so a binding never reveals another tenant's instances.
    """


class DuplicateInstanceError(DynwfError):
    """`create` was given an id that the tenant already uses."""


class UnknownTenantError(DynwfError, LookupError):
    """No code is registered for this tenant."""


class JournalSchemaError(DynwfError):
    """The journal's schema cannot be brought to this version's: a newer dynwf-ray
    upgraded it, its tables match no schema dynwf-ray made, or the upgrade failed
    (and changed nothing). The message says which."""


class JournalUnavailableError(DynwfError):
    """The journal database refused or failed an operation for a reason of its own: the
    disk is full, the server is unreachable or read-only, a lock or serialization
    conflict, no free connection. Nothing of the operation was written (its transaction
    rolled back).

    `cause` names the condition ("disk full", "read-only", "unreachable", "locked",
    "serialization failure", "disk I/O error", "corrupt", "busy", "database error");
    `retryable` says whether the same call may succeed later without a change to
    the call (True for every cause but a corrupt database). Tenant code never sees
    this error: an activation that meets it is abandoned and retried by the platform.
    """

    def __init__(self, cause: str, detail: str, retryable: bool = True):
        self.cause = cause
        self.detail = detail
        self.retryable = retryable
        hint = "retrying may help once it is fixed" if retryable else "retrying will not help"
        super().__init__(f"the journal is unavailable: {cause} ({detail}); {hint}")

    def __reduce__(self):  # noqa: ANN204 - crosses processes (journal.node_writer)
        return type(self), (self.cause, self.detail, self.retryable)


class InvalidStateError(DynwfError):
    """The operation does not apply to the instance in its current status."""


class NonRetryableError(DynwfError):
    """Raise inside a `step.do` callback to fail the step without retrying."""


class StepFailedError(DynwfError):
    """A step failed for good: its retries ran out or it raised NonRetryableError.

    `error_name` and `message` describe the last attempt's exception; the same
    error is raised again when the instance replays, so `run()` sees it
    consistently in every activation.
    """

    def __init__(self, step: str, error_name: str, message: str, attempts: int):
        self.step = step
        self.error_name = error_name
        self.message = message
        self.attempts = attempts
        super().__init__(
            f"step {step!r} failed after {attempts} attempt(s): {error_name}: {message}"
        )


class ReplayDivergenceError(DynwfError):
    """An instance's recorded history would not replay on another code version
    (`move_to_version(v, check=True)`, `Engine.migrate`): the message names the first
    step where the new code asks for something the journal does not hold, or the
    recorded steps it never asks for. `step` and `count` name that step (None when
    the run ended first)."""

    def __init__(self, message: str, step: str | None = None, count: int | None = None):
        super().__init__(message)
        self.step = step
        self.count = count


class InstanceTerminatingError(DynwfError):
    """Raised at a step of an instance that `terminate(rollback=True)` ends: let it
    through `run()`; the compensations of the completed steps run, then the instance
    ends terminated."""


class RollbackFailedError(DynwfError):
    """`run()` failed, and then the compensation of a completed step (`step.do(...,
    rollback=...)`) failed for good too; the message names both errors and the step."""

    def __init__(self, error: BaseException, step: str, count: int, failed: StepFailedError):
        self.error = error
        self.step = step
        self.count = count
        self.failed = failed
        first = getattr(error, "tenant_error_name", None) or type(error).__name__
        super().__init__(
            f"{first}: {error}; then the rollback of step {step!r} (count {count}) failed "
            f"after {failed.attempts} attempt(s): {failed.error_name}: {failed.message}"
        )


class StepTimeoutError(DynwfError):
    """One attempt of a step ran longer than its timeout."""


class ResourceLimitError(DynwfError):
    """Tenant code went over a limit of its sandbox (memory, CPU time per attempt,
    processes, open files, file size, scratch disk, log volume). The message names
    the limit and its value; the step's retry policy decides what follows."""


class SandboxUnavailableError(DynwfError):
    """Strict sandboxing was asked for but a kernel mechanism it needs is missing;
    the message names it (use `sandbox="process"` to run without the kernel jail)."""


class WorkflowTimeoutError(DynwfError, TimeoutError):
    """`step.wait_for_event` reached its timeout without a matching event."""


def invalid(what: str, exc: Exception) -> InvalidInputError:
    """`InvalidInputError` for a pydantic `ValidationError` (or our own error) of `what`."""
    return InvalidInputError(f"{what}: {describe(exc)}")


def describe(exc: Exception) -> str:
    """A pydantic `ValidationError` as a user reads it: each wrong field as `<field>: <what
    is wrong>` (at most three), not pydantic's dump; any other error as its text."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    found = errors()
    parts = []
    for err in found[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(msg if not where or msg.startswith(where) else f"{where}: {msg}")
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    return "; ".join(parts) + more

