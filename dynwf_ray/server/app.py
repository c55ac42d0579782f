"""The HTTP API's routes: tenants and their code, instances, steps, logs, stats, webhooks.

Every route under /v1 but health, readiness and webhooks needs a bearer token
(`auth.py`); each resolves what the caller reaches before it touches the journal,
then acts through the engine's tenant binding, as a platform's Python code would.
The dashboard (`static/`) is served at `/`."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Path as PathParam, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ..binding import InstanceHandle, WorkflowBinding
from ..engine import Engine
from ..errors import DuplicateInstanceError, InvalidInputError, UnknownTenantError
from ..types import ID_PATTERN, MAX_ID_LENGTH, TERMINAL, InstanceStatus, validate_id
from . import errors
from .archive import unpack
from .auth import HUB_DELIVERY_HEADER, HUB_SIGNATURE_HEADER, SIGNATURE_HEADER, Caller, caller, check_signature, delivery_id
from .limits import BodyLimits
from .models import (
    Accepted,
    BatchCreated,
    BatchRequest,
    ClientConfig,
    Created,
    CreateRequest,
    EventRequest,
    InstanceDetail,
    InstancePage,
    Live,
    LogPage,
    Pushed,
    Ready,
    RestartRequest,
    Stats,
    Steps,
    TerminateRequest,
    Tenant,
    Tenants,
    Version,
    Versions,
    WhoAmI,
    step_of,
    summary_of,
    trace_id_of,
)
from .settings import ServerSettings

STATIC = Path(__file__).parent / "static"
Auth = Annotated[Caller, Depends(caller)]
TenantId = Annotated[str, PathParam(pattern=ID_PATTERN, max_length=MAX_ID_LENGTH)]
InstanceId = Annotated[str, PathParam(pattern=ID_PATTERN, max_length=MAX_ID_LENGTH)]
#: Seconds between polls of the journal while streaming an instance's logs.
LOG_POLL = 0.5


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The API and dashboard in front of a running `engine`."""
    settings = settings or ServerSettings()
    app = FastAPI(
        title="dynwf-ray", version="1", docs_url=None, redoc_url=None,
        description="Durable, per-tenant workflows on Ray: the HTTP API of `dynwf serve`.",
    )
    app.state.engine, app.state.settings = engine, settings
    errors.install(app)
    # The routes themselves, not `include_router`: FastAPI rebuilds an included
    # router's per-route context on every request (a third of a request's CPU).
    app.router.routes.extend(router.routes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_api_route("/", _dashboard, include_in_schema=False)
    app.add_middleware(BodyLimits, code_limit=settings.code_limit)
    return app


async def _dashboard() -> FileResponse:
    return FileResponse(STATIC / "index.html")


router = APIRouter(prefix="/v1", responses=errors.ERROR_RESPONSES)


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _binding(request: Request, tenant: str) -> WorkflowBinding:
    return _engine(request).binding(tenant)


# -- health --------------------------------------------------------------------


@router.get("/health", response_model=Live, tags=["health"])
def health() -> Live:
    """Liveness: the server answers."""
    return Live(live=True)


@router.get("/ready", response_model=Ready, tags=["health"],
            responses={503: {"model": Ready, "description": "not ready"}})
def ready(request: Request, response: Response) -> Ready:
    """Readiness: the engine's scheduler runs and its journal can be written."""
    h = _engine(request).health()
    journal = {k: h["journal"].get(k) for k in ("ok", "cause", "detail")}
    if not h["ready"]:
        response.status_code = 503
    return Ready(ready=h["ready"], journal=journal)


@router.get("/whoami", response_model=WhoAmI, tags=["health"])
def whoami(who: Auth) -> WhoAmI:
    return WhoAmI(admin=who.admin, tenant=who.tenant, token_id=who.token_id)


@router.get("/config", response_model=ClientConfig, tags=["health"])
def client_config(request: Request, who: Auth) -> ClientConfig:
    """What the dashboard needs to know of the server's settings."""
    return ClientConfig(trace_url=request.app.state.settings.trace_url)


# -- tenants and code -------------------------------------------------------------


@router.get("/tenants", response_model=Tenants, tags=["tenants"])
def list_tenants(request: Request, who: Auth) -> Tenants:
    rows = _engine(request).journal.list_tenants()
    return Tenants(tenants=[
        Tenant(tenant=t, latest_version=v, updated_at=at) for t, v, at in rows
        if who.admin or t == who.tenant
    ])


@router.get("/tenants/{tenant}/versions", response_model=Versions, tags=["tenants"])
def list_versions(request: Request, tenant: TenantId, who: Auth) -> Versions:
    versions = _engine(request).versions(who.tenant_scope(tenant))
    if not versions:
        raise UnknownTenantError(f"no tenant {tenant!r}")
    return Versions(versions=[Version(**v) for v in versions])


@router.put(
    "/tenants/{tenant}/code", response_model=Pushed, status_code=201, tags=["tenants"],
    openapi_extra={"requestBody": {"required": True, "content": {
        t: {"schema": {"type": "string", "format": "binary"}}
        for t in ("application/zip", "application/gzip", "application/octet-stream")
    }}},
)
async def push_code(request: Request, tenant: TenantId, who: Auth) -> Pushed:
    """Push a tenant's code (admin): a zip or gzip'd tarball of its code directory. It is
    validated in its runtime env (installing its pip packages, if any) and becomes the
    tenant's latest version; code that does not import is refused, storing nothing."""
    who.require_admin()
    who.tenant_scope(tenant)
    data = await request.body()
    if not data:
        raise InvalidInputError("the body must be the code archive; it is empty")

    def store() -> str:
        with tempfile.TemporaryDirectory(prefix="dynwf-push-") as tmp:
            code = unpack(data, Path(tmp), request.app.state.settings.code_limit)
            return _engine(request).push_tenant(tenant, str(code))

    return Pushed(tenant=tenant, version=await run_in_threadpool(store))


# -- instances -------------------------------------------------------------------


@router.post("/tenants/{tenant}/instances", response_model=Created, status_code=201,
             tags=["instances"])
def create_instance(request: Request, tenant: TenantId, body: CreateRequest, who: Auth) -> Created:
    handle = _binding(request, who.tenant_scope(tenant)).create(id=body.id, params=body.params)
    return Created(tenant=tenant, id=handle.id, outcome="created")


@router.post("/tenants/{tenant}/instances/batch", response_model=BatchCreated, tags=["instances"])
def create_batch(request: Request, tenant: TenantId, body: BatchRequest, who: Auth) -> BatchCreated:
    """Create up to 100 instances in one transaction; each item says what became of it."""
    handles = _binding(request, who.tenant_scope(tenant)).create_batch(
        [item.model_dump(exclude_unset=True) for item in body.items]
    )
    return BatchCreated(items=[
        Created(tenant=tenant, id=h.id, outcome=h.outcome or "created", error=h.error) for h in handles
    ])


Limit = Annotated[int, Query(ge=1, le=500)]
Cursor = Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$",
                                     description="`next_cursor` of the previous page")]


def _page(request: Request, tenant: str | None, status: InstanceStatus | None,
          created_after: float | None, created_before: float | None, limit: int,
          cursor: str | None) -> InstancePage:
    before = _cursor(cursor)
    rows = _engine(request).journal.list_instances(
        tenant, status.value if status else None, limit + 1, created_after=created_after,
        created_before=created_before, before_pk=before,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return InstancePage(instances=[summary_of(i) for i in rows],
                        next_cursor=str(rows[-1].pk) if more and rows else None)


def _cursor(cursor: str | None) -> int | None:
    if cursor is None or cursor == "":
        return None
    if not cursor.isdigit() or len(cursor) > 18:
        raise InvalidInputError(f"cursor {cursor[:40]!r} is not one this API returned")
    return int(cursor)


@router.get("/tenants/{tenant}/instances", response_model=InstancePage, tags=["instances"])
def list_instances(
    request: Request, tenant: TenantId, who: Auth, status: InstanceStatus | None = None,
    created_after: float | None = None, created_before: float | None = None,
    limit: Limit = 50, cursor: Cursor = None,
) -> InstancePage:
    """A tenant's instances, newest first, a page at a time."""
    return _page(request, who.tenant_scope(tenant), status, created_after, created_before,
                 limit, cursor)


@router.get("/instances", response_model=InstancePage, tags=["instances"])
def list_all_instances(
    request: Request, who: Auth, tenant: Annotated[str | None, Query(pattern=ID_PATTERN, max_length=MAX_ID_LENGTH)] = None,
    status: InstanceStatus | None = None, created_after: float | None = None,
    created_before: float | None = None, limit: Limit = 50, cursor: Cursor = None,
) -> InstancePage:
    """Instances of every tenant the caller reaches (a tenant token: its own), newest first."""
    scope = who.tenant_scope(tenant) if tenant else who.tenant
    return _page(request, scope, status, created_after, created_before, limit, cursor)


@router.get("/tenants/{tenant}/instances/{id}", response_model=InstanceDetail, tags=["instances"])
def get_instance(request: Request, tenant: TenantId, id: InstanceId, who: Auth) -> InstanceDetail:
    tenant, id = who.instance_scope(tenant, id)
    return _detail(request, tenant, id)


def _detail(request: Request, tenant: str, id: str) -> InstanceDetail:
    engine = _engine(request)
    info = engine.journal.require_instance(tenant, id)
    report = InstanceHandle(engine.binding(tenant), id).status()  # it exists: `info`
    trace_id = trace_id_of(info)
    template = request.app.state.settings.trace_url
    return InstanceDetail(
        **summary_of(info).model_dump(), params=json.loads(info.params_json),
        output=report["output"], condition=report["condition"], warning=report["warning"],
        rollback=report["rollback"], wake_at=info.wake_at, waiting_for=info.waiting_for,
        pause_requested=info.pause_requested, activations=info.activations, trace_id=trace_id,
        trace_url=template.format(trace_id=trace_id, tenant=tenant) if template and trace_id else None,
    )


@router.delete("/tenants/{tenant}/instances/{id}", status_code=204, tags=["instances"])
def delete_instance(request: Request, tenant: TenantId, id: InstanceId, who: Auth, force: bool = False) -> Response:
    """Delete an instance with its steps, events and logs (refused while it runs, unless `force`)."""
    _handle(request, tenant, id, who).delete(force=force)
    return Response(status_code=204)


def _handle(request: Request, tenant: str, id: str, who: Caller) -> InstanceHandle:
    """The instance's handle, if the caller reaches it (else the 404 of an unknown id)."""
    tenant, id = who.instance_scope(tenant, id)
    return _binding(request, tenant).get(id)


def _accepted(request: Request, handle: InstanceHandle) -> Accepted:
    """What an action answers: the instance's status right after it."""
    tenant = handle.tenant_id
    info = _engine(request).journal.require_instance(tenant, handle.id)
    return Accepted(tenant=tenant, id=handle.id, status=info.status)


@router.post("/tenants/{tenant}/instances/{id}/pause", response_model=Accepted, status_code=202,
             tags=["lifecycle"])
def pause(request: Request, tenant: TenantId, id: InstanceId, who: Auth) -> Accepted:
    """Pause at the next step boundary."""
    handle = _handle(request, tenant, id, who)
    handle.pause()
    return _accepted(request, handle)


@router.post("/tenants/{tenant}/instances/{id}/resume", response_model=Accepted, status_code=202,
             tags=["lifecycle"])
def resume(request: Request, tenant: TenantId, id: InstanceId, who: Auth) -> Accepted:
    handle = _handle(request, tenant, id, who)
    handle.resume()
    return _accepted(request, handle)


@router.post("/tenants/{tenant}/instances/{id}/terminate", response_model=Accepted,
             status_code=202, tags=["lifecycle"])
def terminate(request: Request, tenant: TenantId, id: InstanceId, who: Auth,
              body: TerminateRequest | None = None) -> Accepted:
    """End the instance now; with `rollback`, after its completed steps' compensations."""
    handle = _handle(request, tenant, id, who)
    handle.terminate(rollback=bool(body and body.rollback))
    return _accepted(request, handle)


@router.post("/tenants/{tenant}/instances/{id}/restart", response_model=Accepted,
             status_code=202, tags=["lifecycle"])
def restart(request: Request, tenant: TenantId, id: InstanceId, who: Auth,
            body: RestartRequest | None = None) -> Accepted:
    """Run again from the beginning, or from a step (`from_step`), keeping what came before."""
    handle = _handle(request, tenant, id, who)
    step = body.from_step if body else None
    handle.restart((step.name, step.count) if step else None)
    return _accepted(request, handle)


@router.post("/tenants/{tenant}/instances/{id}/events", response_model=Accepted,
             status_code=202, tags=["lifecycle"])
def send_event(request: Request, tenant: TenantId, id: InstanceId, body: EventRequest, who: Auth) -> Accepted:
    """Deliver an event; it waits in the inbox until a `wait_for_event` of its type takes it."""
    handle = _handle(request, tenant, id, who)
    handle.send_event(body.type, body.payload)
    return _accepted(request, handle)


@router.get("/tenants/{tenant}/instances/{id}/steps", response_model=Steps, tags=["instances"])
def steps(request: Request, tenant: TenantId, id: InstanceId, who: Auth) -> Steps:
    """The instance's steps: name, occurrence count, status, attempts, timings, result or error."""
    tenant, id = who.instance_scope(tenant, id)
    journal = _engine(request).journal
    info = journal.require_instance(tenant, id)
    return Steps(steps=[step_of(s) for s in journal.list_steps(info.pk)])


After = Annotated[int, Query(ge=0, description="only lines with a greater id")]


@router.get("/tenants/{tenant}/instances/{id}/logs", response_model=LogPage, tags=["instances"])
def logs(request: Request, tenant: TenantId, id: InstanceId, who: Auth, after: After = 0,
         limit: Annotated[int, Query(ge=1, le=1000)] = 1000) -> LogPage:
    """What the instance's code printed or logged, oldest first."""
    lines = _handle(request, tenant, id, who).logs(after=after, limit=limit)
    return LogPage(lines=lines, next_after=lines[-1].id if lines else after)


@router.get(
    "/tenants/{tenant}/instances/{id}/logs/stream", tags=["instances"],
    responses={200: {"content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["event", "data"], "properties": {
            "event": {"enum": ["log", "end"]}, "id": {"type": "string"},
            "data": {"type": "string", "description": "log: a LogLine; end: {\"status\": ...}"},
        }}}}, "description": "`log` events (data: a LogLine), then one `end` event"}},
)
async def stream_logs(request: Request, tenant: TenantId, id: InstanceId, who: Auth, after: After = 0) -> StreamingResponse:
    """The instance's log lines as server-sent events, live: one `log` event per line (its
    `id` is the line's), then an `end` event with the final status once it has finished.
    A `Last-Event-ID` header resumes after that line."""
    tenant, id = who.instance_scope(tenant, id)
    journal = _engine(request).journal
    info = await run_in_threadpool(journal.require_instance, tenant, id)
    resume = request.headers.get("last-event-id", "")
    start = int(resume) if resume.isdigit() and len(resume) < 18 else after

    async def events() -> AsyncIterator[str]:
        last, quiet = start, 0.0
        while not await request.is_disconnected():
            lines = await run_in_threadpool(journal.read_logs, info.pk, last, 500)
            for line in lines:
                last = line.id or last
                yield f"event: log\nid: {line.id}\ndata: {line.model_dump_json()}\n\n"
            if len(lines) == 500:
                continue
            current = await run_in_threadpool(journal.get_instance, tenant, id)
            if current is not None and current.pk != info.pk:
                current = None  # deleted, and its id given to a new instance since
            if current is None or current.status in TERMINAL:
                status = current.status if current else "deleted"
                if not await run_in_threadpool(journal.read_logs, info.pk, last, 1):
                    yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                    return
                continue
            quiet += LOG_POLL
            if quiet >= 15:  # a comment keeps proxies from closing an idle stream
                quiet = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(LOG_POLL)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- overview --------------------------------------------------------------------


@router.get("/stats", response_model=Stats, tags=["overview"])
def stats(request: Request, who: Auth) -> Stats:
    """Instances by tenant and status, and (admin) the engine's activity counters."""
    engine = _engine(request)
    by_tenant: dict[str, dict[str, int]] = {}
    for (t, status), n in engine.journal.count_by_tenant_status().items():
        if who.admin or t == who.tenant:
            by_tenant.setdefault(t, {})[status] = n
    sandboxes: dict[str, int] = {}
    for host in engine.sandboxes():
        if who.admin or host["tenant"] == who.tenant:
            sandboxes[host["tenant"]] = sandboxes.get(host["tenant"], 0) + len(host["sandboxes"])
    counters = engine.stats() if who.admin else {}
    return Stats(
        now=time.time(), by_tenant=by_tenant, activations=counters.get("activations"),
        cold_starts=counters.get("cold_starts"), hosts=counters.get("live_hosts"),
        sandboxes=sum(sandboxes.values()), sandboxes_by_tenant=sandboxes,
    )


# -- webhooks --------------------------------------------------------------------


@router.post(
    "/webhooks/{tenant}", response_model=Created, status_code=201, tags=["webhooks"],
    responses={200: {"model": Created, "description": "a redelivery: the instance existed"}},
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
        "parameters": [
            {"name": SIGNATURE_HEADER, "in": "header", "required": True, "schema": {"type": "string"},
             "description": "sha256=<hex HMAC-SHA256 of the body with the tenant's webhook secret>"},
            {"name": "X-Dynwf-Delivery", "in": "header", "required": False,
             "schema": {"type": "string"}, "description": "a delivery id: the instance is wh-<id>"},
        ],
    },
)
async def webhook(request: Request, tenant: str, response: Response) -> Created:
    """Start an instance from a signed POST (no token): the JSON body is its params. With
    `X-Dynwf-Delivery`, a redelivery of the same id creates nothing new (200, "existed")."""
    try:
        validate_id(tenant, "tenant id")
    except InvalidInputError:
        tenant = None  # answered below exactly as a bad signature
    body = await request.body()
    engine = _engine(request)
    secret = await run_in_threadpool(engine.journal.webhook_secret, tenant) if tenant else None
    check_signature(secret, body, request.headers.get(SIGNATURE_HEADER)
                    or request.headers.get(HUB_SIGNATURE_HEADER))
    try:
        params = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"the webhook body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInputError("the webhook body is not valid JSON: nested too deeply") from None
    instance_id = delivery_id(request.headers.get("x-dynwf-delivery")
                              or request.headers.get(HUB_DELIVERY_HEADER))
    try:
        handle = await run_in_threadpool(engine.binding(tenant).create, instance_id, params)
    except DuplicateInstanceError:
        if instance_id is None:
            raise
        response.status_code = 200
        return Created(tenant=tenant, id=instance_id, outcome="existed")
    return Created(tenant=tenant, id=handle.id, outcome="created")
