"""`WorkflowBinding` and `InstanceHandle`: a tenant's WORKFLOWS binding.

A binding is scoped to one tenant: every instance it creates, gets or signals
is looked up by (tenant, id), so another tenant's instance is indistinguishable
from an unknown id. It works in any process that can reach the journal (the
platform's driver, an instance host, the CLI); `notify` wakes the hosts of that
code version (through the engine's `Router`; the scheduler when no route is known),
so that they do not wait for their next poll.

Calls that cannot reach or write the journal raise `JournalUnavailableError`
(naming the cause) and write nothing; `status()` says when a platform condition
keeps an instance from going on.

Each new instance starts a trace: in the caller's trace when `create` runs
inside a span (see `tracing.py`). Terminating, restarting or deleting an
unfinished instance ends that trace's root span, exported with the tenant's telemetry settings
(`otel_env`: the platform's OTEL_* layer; None exports nothing).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Iterable, Mapping

from pydantic import ValidationError

from .errors import InvalidInputError, InvalidStateError, JournalUnavailableError, PayloadTooLargeError, describe
from .journal import Journal
from .journal.schema import MAX_ROW_ID
from .logs import PLATFORM_STREAM
from .tracing import end_instance_trace, new_trace_context
from .types import (
    MAX_BATCH,
    CreateOptions,
    InstanceError,
    TERMINAL,
    InstanceStatus,
    StatusReport,
    LogLine,
    to_json,
    validate_event_type,
    validate_id,
    validate_step_name,
)


#: Instance methods tenant code may call on handles from its WORKFLOWS binding.
_SANDBOX_INSTANCE_METHODS = {
    "status", "pause", "resume", "terminate", "restart", "send_event", "logs",
}


#: Statuses of instances a platform condition can keep from going on.
_BLOCKABLE = {InstanceStatus.queued, InstanceStatus.running, InstanceStatus.waiting,
              InstanceStatus.waitingForPause}


def _no_notify(tenant_id: str, version: str | None) -> None:
    return None


class InstanceHandle:
    """One workflow instance, addressed by id within its tenant."""

    def __init__(self, binding: "WorkflowBinding", instance_id: str, outcome: str | None = None,
                 error: str | None = None):
        self._binding = binding
        self.id = instance_id
        #: What the `create` / `create_batch` that returned it did: "created", "existed"
        #: (create_batch: the id was taken; its params were ignored) or "invalid"
        #: (create_batch: the item was refused, `error` says why; nothing was stored).
        self.outcome = outcome
        self.error = error

    def __repr__(self) -> str:
        return f"InstanceHandle(tenant={self._binding.tenant_id!r}, id={self.id!r})"

    @property
    def tenant_id(self) -> str:
        return self._binding.tenant_id

    def status(self) -> dict[str, Any]:
        """{"status", "error": {name, message} | None, "output"} (Cloudflare's shape),
        plus "version": the code version the instance runs, "condition": what of
        the platform keeps it from going on, if anything (None; or, say,
        "journal unavailable: disk full (...)" while the journal cannot be written),
        "rollback": the compensations run so far after `run()` failed
        (`step.do(..., rollback=...)`), in the order they ran (the newest step's
        first): {"step", "count", "status", "attempts", "error"}, and "warning": the
        newest line the platform added to its log, e.g. a determinism warning (a
        replay that went on to a new step without asking for recorded ones).

        "unknown" is the status when the journal cannot be read now (unreachable, say):
        "condition" then says why, and the other fields are empty."""
        try:
            info = self._binding._journal.require_instance(self._binding.tenant_id, self.id)
        except JournalUnavailableError as exc:
            return {"status": "unknown", "error": None, "output": None, "version": None,
                    "condition": f"journal unavailable: {exc.cause} ({exc.detail})",
                    "rollback": [], "warning": None}
        error = (
            InstanceError(name=info.error_name, message=info.error_message or "")
            if info.error_name
            else None
        )
        output = json.loads(info.output_json) if info.output_json is not None else None
        status = StatusReport(status=info.status, error=error, output=output).model_dump()
        blocked = info.status in _BLOCKABLE and self._binding._condition()
        rollback = [
            {"step": s.name, "count": -s.seq, "status": s.status, "attempts": s.attempts,
             "error": f"{s.error_name}: {s.error_message}" if s.error_name else None}
            for s in self._binding._journal.rollback_steps(info.pk)
        ] if info.status != InstanceStatus.queued else []
        return {**status, "version": info.code_version, "condition": blocked or None,
                "rollback": rollback,
                "warning": self._binding._journal.last_line(info.pk, PLATFORM_STREAM)}

    def pause(self) -> None:
        self._binding._journal.pause(self._binding.tenant_id, self.id, self._binding._clock())

    def resume(self) -> None:
        self._binding._journal.resume(self._binding.tenant_id, self.id, self._binding._clock())
        self._binding._notify(self._binding.tenant_id, None)

    def terminate(self, rollback: bool = False) -> None:
        """End the instance now; a running activation is fenced. With `rollback`, its next
        activation (at once) first runs the compensations of its completed steps
        (`step.do(..., rollback=...)`), newest first, then ends it terminated; its status
        stays what it was until then."""
        _flag(rollback, "rollback")
        now = self._binding._clock()
        info = self._binding._journal.terminate(self._binding.tenant_id, self.id, now, rollback)
        if rollback:
            self._binding._notify(self._binding.tenant_id, info.code_version)
        else:
            self._binding._end_trace(info, InstanceStatus.terminated, now)

    def restart(self, from_step: tuple[str, int] | list | None = None) -> None:
        """Run again, in a new trace (the old one's root span ends): from the beginning, or
        `from_step=(name, count)`: the results recorded before that step are kept; it and
        every step after it run again (the events their waits took and the lines they
        printed are discarded). `count` is the occurrence of `name` (1: its first)."""
        if from_step is not None:
            if not isinstance(from_step, (tuple, list)) or len(from_step) != 2 \
                    or not isinstance(from_step[1], int) or isinstance(from_step[1], bool) \
                    or not 1 <= from_step[1] <= MAX_ROW_ID:
                raise InvalidInputError(
                    f"from_step must be (step name, count from 1 to {MAX_ROW_ID}), got {str(from_step)[:80]}"
                )
            from_step = (validate_step_name(from_step[0]), from_step[1])
        now = self._binding._clock()
        info = self._binding._journal.restart(
            self._binding.tenant_id, self.id, now, new_trace_context(), from_step
        )
        if info.status not in TERMINAL:
            self._binding._end_trace(info, "restarted", now)
        self._binding._notify(self._binding.tenant_id, info.code_version)

    def delete(self, force: bool = False) -> None:
        """Delete the instance with its steps, events and logs (its id may then be used
        again). Refused with InvalidStateError while it runs, unless `force`: its
        activation is then fenced out and stops at its next step."""
        _flag(force, "force")
        now = self._binding._clock()
        info = self._binding._journal.delete_instance(self._binding.tenant_id, self.id, now, force)
        if info.status not in TERMINAL:
            self._binding._end_trace(info, "deleted", now)

    def logs(self, after: int = 0, limit: int = 1000) -> list[LogLine]:
        """What the instance's code printed or logged (the newest lines are kept, see
        `EngineConfig.log_lines_per_instance`), oldest first, ids greater than `after`."""
        for value, what in ((after, "after"), (limit, "limit")):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ROW_ID:
                raise InvalidInputError(f"logs(): {what} must be a whole number from 0 to {MAX_ROW_ID}, "
                                        f"got {str(value)[:40]!r}")
        info = self._binding._journal.require_instance(self._binding.tenant_id, self.id)
        return self._binding._journal.read_logs(info.pk, after, limit)

    def move_to_version(self, version: str, check: bool = True) -> None:
        """Run this instance on another stored code version of its tenant from its next
        activation on. Replay then runs the new code against the recorded steps, so the
        new version must reach the same steps under the same names: with `check` (the
        default) its history is first replayed on `version` in a sandbox, running no
        step, and a history that would not replay is refused with ReplayDivergenceError
        naming where (`replay_check.py`; needs an engine's binding)."""
        binding = self._binding
        if check:
            binding._journal.check_movable(binding.tenant_id, self.id, version)
            if binding._replay_check is None:
                raise InvalidStateError(
                    "a replay check runs tenant code in a sandbox, which needs an engine "
                    "(engine.binding(...)); move with check=False to skip it"
                )
            binding._replay_check(binding.tenant_id, self.id, version)
        binding._journal.set_version(binding.tenant_id, self.id, version, binding._clock())

    def send_event(self, type: str, payload: Any = None) -> None:
        """Deliver an event; buffered until a `wait_for_event` of that type takes it."""
        validate_event_type(type)
        payload_json = to_json(payload, f"payload of event {type!r}")
        info = self._binding._journal.send_event(
            self._binding.tenant_id, self.id, type, payload_json, self._binding._clock()
        )
        self._binding._notify(self._binding.tenant_id, info.code_version)


class WorkflowBinding:
    """Create and look up one tenant's instances."""

    def __init__(
        self,
        journal: Journal,
        tenant_id: str,
        *,
        notify: Callable[[str, str | None], Any] = _no_notify,
        clock: Callable[[], float] = time.time,
        metadata: Mapping[str, Any] | None = None,
        otel_env: Mapping[str, str] | None = None,
        condition: Callable[[], str | None] | None = None,
        replay_check: Callable[[str, str, str], None] | None = None,
    ):
        self._journal = journal
        self._replay_check = replay_check  # (tenant, instance, version): raises on divergence
        # What blocks instances now (`status()["condition"]`): the engine's view when
        # the engine gives one, else what this process's journal writes have seen.
        self._condition = condition or journal.health.condition
        self._otel_env = otel_env
        self.tenant_id = validate_id(tenant_id, "tenant id")
        self._notify = notify
        self._clock = clock
        self._metadata = _checked_metadata(metadata)

    def __repr__(self) -> str:
        return f"WorkflowBinding(tenant={self.tenant_id!r})"

    def create(self, id: str | None = None, params: Any = None) -> InstanceHandle:
        """Create an instance (id optional; a duplicate id raises DuplicateInstanceError)."""
        instance_id, params_json, trace = self._item(_options(id=id, params=params))
        version, _ = self._journal.create_on_latest(
            self.tenant_id,
            lambda version: [(instance_id, params_json, self._metadata_json(version), *trace)],
            self._clock(), skip_existing=False,
        )
        self._notify(self.tenant_id, version)
        return InstanceHandle(self, instance_id, "created")

    def create_batch(self, items: Iterable[Mapping[str, Any]]) -> list[InstanceHandle]:
        """Create up to 100 instances at once, in one transaction. Each item gets a
        handle, in order, whose `outcome` says what became of it: "created";
        "existed" (the tenant has that id, or an earlier item of the batch had it: its
        params are ignored); or "invalid" (`error` names what was wrong; nothing was
        stored for it, and the other items are not held back)."""
        if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
            raise InvalidInputError(
                f"create_batch takes a list of items (mappings), got {type(items).__name__}")
        items = list(items)
        if len(items) > MAX_BATCH:
            raise InvalidInputError(
                f"create_batch takes at most {MAX_BATCH} instances, got {len(items)}"
            )
        rows, handles = [], []
        for i, item in enumerate(items):
            try:
                if not isinstance(item, Mapping):
                    raise InvalidInputError(f"item {i}: expected a mapping, got {type(item).__name__}")
                if not all(isinstance(key, str) for key in item):
                    raise InvalidInputError(f"item {i}: its keys must be strings (id, params)")
                row = self._item(_options(**dict(item)))
            except InvalidInputError as exc:
                given = item.get("id") if isinstance(item, Mapping) else None
                handles.append(InstanceHandle(
                    self, given if isinstance(given, str) else None, "invalid", str(exc)))
                continue
            rows.append(row)
            handles.append(InstanceHandle(self, row[0]))

        def stored(version: str) -> list:
            metadata_json = self._metadata_json(version)
            return [(iid, params_json, metadata_json, *trace) for iid, params_json, trace in rows]

        version, ids = self._journal.create_on_latest(
            self.tenant_id, stored, self._clock(), skip_existing=True)
        created = set(ids)
        for handle in handles:
            if handle.outcome is None:
                handle.outcome = "created" if handle.id in created else "existed"
                created.discard(handle.id)  # a repeated id: its first item created it
        if any(h.outcome == "created" for h in handles):
            self._notify(self.tenant_id, version)
        return handles

    def get(self, id: str) -> InstanceHandle:
        """The handle of an existing instance; unknown ids raise InstanceNotFoundError."""
        validate_id(id)
        self._journal.require_instance(self.tenant_id, id)
        return InstanceHandle(self, id)

    def sandbox_call(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Answer `env["WORKFLOWS"].<method>(...)` called by tenant code in a sandbox.

        Arguments and results are JSON: handles travel as instance ids, and
        `instance.<m>` methods name the instance by their first argument. Only
        this tenant's instances are reachable, as for any caller of the binding.
        """
        try:
            if method == "create":
                return self.create(*args, **kwargs).id
            if method == "create_batch":
                return [{"id": h.id, "outcome": h.outcome, "error": h.error}
                        for h in self.create_batch(*args, **kwargs)]
            if method == "get":
                return self.get(*args, **kwargs).id
            name = method.removeprefix("instance.")
            if name not in _SANDBOX_INSTANCE_METHODS or not args or not isinstance(args[0], str):
                raise InvalidInputError(f"WORKFLOWS has no method {method!r}")
            result = getattr(self.get(args[0]), name)(*args[1:], **kwargs)
        except TypeError as exc:
            raise InvalidInputError(f"WORKFLOWS.{method}(): {exc}") from None
        if isinstance(result, list):
            return [r.model_dump() if hasattr(r, "model_dump") else r for r in result]
        return result

    def _item(self, options: CreateOptions) -> tuple[str, str, tuple[str | None, str | None]]:
        """What is persisted of one instance besides its envelope: (id, params_json,
        its trace identity (trace_context, trace_caller))."""
        instance_id = options.id or uuid.uuid4().hex
        params_json = to_json(options.params, f"params of instance {instance_id!r}")
        return instance_id, params_json, new_trace_context()

    def _metadata_json(self, version: str) -> str:
        """The envelope's metadata persisted with each instance (the code version is the
        tenant's newest, read in the create's transaction)."""
        return json.dumps({**self._metadata, "tenant_id": self.tenant_id, "code_version": version})

    def _end_trace(self, info: Any, status: str, now: float) -> None:
        if self._otel_env is not None:
            end_instance_trace(self._journal, self._otel_env, info, status, now)


def _flag(value: Any, what: str) -> None:
    """A yes/no argument must be a bool: `force="false"` is not False."""
    if not isinstance(value, bool):
        raise InvalidInputError(f"{what} must be True or False, got {str(value)[:40]!r}")


def _checked_metadata(metadata: Any) -> dict[str, Any]:
    """A binding's metadata (stored with each instance it creates): a mapping with string
    keys, JSON, at most 64 KiB."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise InvalidInputError("a binding's metadata must be a mapping with string keys")
    text = to_json(dict(metadata), "a binding's metadata")
    if len(text) > MAX_METADATA_BYTES:
        raise PayloadTooLargeError(
            f"a binding's metadata is {len(text)} bytes serialized; the limit is {MAX_METADATA_BYTES}")
    return json.loads(text)


#: The most a binding's metadata may take, serialized: it is stored with every instance.
MAX_METADATA_BYTES = 64 * 1024


def _options(**kwargs: Any) -> CreateOptions:
    try:
        return CreateOptions(**kwargs)
    except ValidationError as exc:
        raise InvalidInputError(describe(exc)) from None
