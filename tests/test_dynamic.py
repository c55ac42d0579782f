"""Tests of `dynwf_ray.dynamic`: each half alone, with plain fakes (no Ray, no journal).

The binding wrapper runs against a fake binding that records what it was asked
to create; the dispatcher runs against hand-built events, a dummy step and fake
runners. The envelope layout is spelled out here on purpose: if it changes, these
tests should change with it.
"""

from __future__ import annotations

import asyncio
import copy
from datetime import datetime, timezone

import pytest

from dynwf_ray import DynwfError, WorkflowEntrypoint, WorkflowEvent
from dynwf_ray.dynamic import (
    DynamicWorkflowBinding,
    MissingDispatcherMetadataError,
    WorkflowRunner,
    create_dynamic_workflow_entrypoint,
    dispatch_workflow,
    wrap_workflow_binding,
)
from dynwf_ray.errors import InvalidInputError

TS = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)
STEP = object()


class FakeHandle:
    def __init__(self, id):
        self.id = id


class FakeBinding:
    """Records every call; returns a handle per created instance."""

    def __init__(self):
        self.calls = []

    def create(self, id=None, params=None):
        self.calls.append(("create", {"id": id, "params": params}))
        return FakeHandle(id or "auto-id")

    def create_batch(self, items):
        items = list(items)
        self.calls.append(("create_batch", items))
        return [FakeHandle(it.get("id") or "auto-id") for it in items]

    def get(self, id):
        self.calls.append(("get", id))
        return FakeHandle(id)


def envelope_event(params, metadata, instance_id="instance-1"):
    return WorkflowEvent(
        payload={"metadata": metadata, "params": params}, timestamp=TS, instance_id=instance_id
    )


def bare_event(payload):
    return WorkflowEvent(payload=payload, timestamp=TS, instance_id="instance-1")


class RecordingRunner:
    def __init__(self, result="ok"):
        self.result = result
        self.seen = []

    async def run(self, event, step):
        self.seen.append((event, step))
        return self.result


def dispatch(event, load_runner, env=None, step=STEP):
    return asyncio.run(dispatch_workflow(env or {}, event, step, load_runner))


# --- outbound: wrap_workflow_binding ------------------------------------------------


def test_create_stores_envelope_and_returns_inner_handle():
    fake = FakeBinding()
    wrapped = wrap_workflow_binding(fake, {"tenant_id": "acme"})
    handle = wrapped.create(id="wf-1", params={"input": "hello"})
    assert handle.id == "wf-1"
    assert fake.calls == [
        ("create", {"id": "wf-1", "params": {"metadata": {"tenant_id": "acme"},
                                             "params": {"input": "hello"}}})
    ]


def test_create_without_params_wraps_none():
    fake = FakeBinding()
    wrap_workflow_binding(fake, {"tenant_id": "t1"}).create()
    assert fake.calls == [("create", {"id": None, "params": {"metadata": {"tenant_id": "t1"},
                                                             "params": None}})]


def test_create_batch_wraps_every_item():
    fake = FakeBinding()
    wrapped = wrap_workflow_binding(fake, {"tenant_id": "t1"})
    handles = wrapped.create_batch(
        iter([{"id": "a", "params": {"n": 1}}, {"id": "b", "params": [2]}, {"id": "c"}, {}])
    )
    assert [h.id for h in handles] == ["a", "b", "c", "auto-id"]
    (kind, items), = fake.calls
    assert kind == "create_batch"
    assert [it.get("id") for it in items] == ["a", "b", "c", None]
    assert all(it["params"]["metadata"] == {"tenant_id": "t1"} for it in items)
    assert [it["params"]["params"] for it in items] == [{"n": 1}, [2], None, None]


def test_create_batch_passes_an_item_that_is_not_a_mapping_on_for_the_binding_to_judge():
    fake = FakeBinding()
    fake.create_batch = lambda items: [("seen", it) for it in items]  # the raw binding marks it invalid
    seen = wrap_workflow_binding(fake, {"tenant_id": "t1"}).create_batch(["x", {"id": "ok"}])
    assert seen[0] == ("seen", "x") and seen[1][1]["params"]["metadata"] == {"tenant_id": "t1"}


def test_arbitrary_json_metadata_is_stored_as_given():
    metadata = {
        "tenant_id": "acme",
        "features": ["beta", "pro", 3, None, True],
        "nested": {"version": 3, "deeper": {"list": [{"x": 1.5}]}},
        "name": "Zoë — 東京 🚀",
    }
    fake = FakeBinding()
    wrapped = wrap_workflow_binding(fake, metadata)
    wrapped.create(params={"job": "x"})
    wrapped.create_batch([{"params": 1}])
    assert fake.calls[0][1]["params"]["metadata"] == metadata
    assert fake.calls[1][1][0]["params"]["metadata"] == metadata
    assert wrapped.metadata == metadata


def test_metadata_must_be_a_json_object():
    for bad in (["tenant"], "acme", None, {"f": object()}, {1: "int key"}):
        with pytest.raises(InvalidInputError):
            wrap_workflow_binding(FakeBinding(), bad)


def test_caller_options_and_metadata_are_not_mutated_or_shared():
    fake = FakeBinding()
    metadata = {"tenant_id": "t1", "tags": ["a"]}
    wrapped = wrap_workflow_binding(fake, metadata)
    params = {"value": 42}
    items = [{"id": "a", "params": {"n": 1}}, {"id": "b"}]
    items_before = copy.deepcopy(items)

    wrapped.create(id="wf-1", params=params)
    wrapped.create_batch(items)

    assert params == {"value": 42}
    assert items == items_before
    assert "params" not in items[1]
    # Later changes to the caller's metadata dict do not leak into new envelopes...
    metadata["tenant_id"] = "changed"
    metadata["tags"].append("b")
    wrapped.create(params=None)
    assert fake.calls[-1][1]["params"]["metadata"] == {"tenant_id": "t1", "tags": ["a"]}
    # ...and envelopes do not share one metadata object.
    first, last = fake.calls[0][1]["params"], fake.calls[-1][1]["params"]
    assert first["metadata"] is not last["metadata"]


def test_reusing_a_wrapped_binding_does_not_accumulate_envelopes():
    fake = FakeBinding()
    wrapped = wrap_workflow_binding(fake, {"tenant_id": "t1"})
    wrapped.create(params={"a": 1})
    wrapped.create(params={"a": 2})
    assert [c[1]["params"]["params"] for c in fake.calls] == [{"a": 1}, {"a": 2}]


def test_wrapping_a_wrapped_binding_replaces_metadata_without_nesting():
    fake = FakeBinding()
    inner = wrap_workflow_binding(fake, {"tenant_id": "t1", "region": "eu"})
    outer = wrap_workflow_binding(inner, {"tenant_id": "t2"})
    outer.create(params={"a": 1})
    outer.create_batch([{"params": {"b": 2}}])
    assert fake.calls[0][1]["params"] == {"metadata": {"tenant_id": "t2"}, "params": {"a": 1}}
    assert fake.calls[1][1][0]["params"] == {"metadata": {"tenant_id": "t2"}, "params": {"b": 2}}
    # The first wrapper is untouched.
    inner.create(params=3)
    assert fake.calls[2][1]["params"]["metadata"] == {"tenant_id": "t1", "region": "eu"}
    # Constructing the class directly behaves the same way.
    DynamicWorkflowBinding(inner, {"x": 1}).create(params=4)
    assert fake.calls[3][1]["params"] == {"metadata": {"x": 1}, "params": 4}


def test_get_passes_through():
    fake = FakeBinding()
    handle = wrap_workflow_binding(fake, {"tenant_id": "t1"}).get("some-id")
    assert handle.id == "some-id"
    assert fake.calls == [("get", "some-id")]


def test_async_inner_binding_results_are_returned_as_is():
    class AsyncBinding(FakeBinding):
        async def create(self, id=None, params=None):
            return FakeBinding.create(self, id=id, params=params)

    fake = AsyncBinding()
    handle = asyncio.run(wrap_workflow_binding(fake, {"t": 1}).create(id="x", params=5))
    assert handle.id == "x"
    assert fake.calls[0][1]["params"] == {"metadata": {"t": 1}, "params": 5}


# --- inbound: dispatch_workflow -----------------------------------------------------


def test_loader_gets_metadata_and_env_and_runner_sees_only_params():
    runner = RecordingRunner("done")
    loads = []

    async def load_runner(metadata, env):
        loads.append((metadata, env))
        return runner

    env = {"LOADER": "the-loader"}
    event = envelope_event({"hello": "world"}, {"tenant_id": "tenant-a"})
    assert dispatch(event, load_runner, env=env) == "done"

    assert loads == [({"tenant_id": "tenant-a"}, env)]
    (inner, step), = runner.seen
    assert isinstance(inner, WorkflowEvent)
    assert inner.payload == {"hello": "world"}
    assert inner.instance_id == "instance-1"
    assert inner.timestamp == TS
    assert step is STEP


def test_params_that_look_like_an_envelope_are_unwrapped_only_once():
    runner = RecordingRunner()
    tenant_params = {"metadata": {"mine": True}, "params": 1}
    dispatch(envelope_event(tenant_params, {"tenant_id": "t"}), lambda m, e: runner)
    assert runner.seen[0][0].payload == tenant_params


def test_sync_and_async_loaders_both_work():
    def sync_loader(metadata, env):
        return RecordingRunner(("sync", metadata["tenant_id"]))

    async def async_loader(metadata, env):
        await asyncio.sleep(0)
        return RecordingRunner(("async", metadata["tenant_id"]))

    event = envelope_event(None, {"tenant_id": "t1"})
    assert dispatch(event, sync_loader) == ("sync", "t1")
    assert dispatch(event, async_loader) == ("async", "t1")


def test_loader_is_called_fresh_for_each_dispatch():
    calls = []

    def loader(metadata, env):
        calls.append(metadata["tenant_id"])
        return RecordingRunner(metadata["tenant_id"])

    assert dispatch(envelope_event({}, {"tenant_id": "a"}), loader) == "a"
    assert dispatch(envelope_event({}, {"tenant_id": "b"}), loader) == "b"
    assert calls == ["a", "b"]


def test_a_workflow_entrypoint_instance_is_a_runner():
    class TenantWorkflow(WorkflowEntrypoint):
        async def run(self, event, step):
            return f"Hello, {event.payload['name']}! ({event.instance_id})"

    assert isinstance(TenantWorkflow(), WorkflowRunner)
    result = dispatch(envelope_event({"name": "Ada"}, {"t": 1}), lambda m, e: TenantWorkflow())
    assert result == "Hello, Ada! (instance-1)"


def test_loader_errors_propagate_unchanged():
    boom = RuntimeError("loader failed")

    async def loader(metadata, env):
        raise boom

    with pytest.raises(RuntimeError) as info:
        dispatch(envelope_event({}, {"t": 1}), loader)
    assert info.value is boom


def test_run_errors_propagate_unchanged():
    class Failing:
        async def run(self, event, step):
            raise KeyError("worker run failed")

    with pytest.raises(KeyError, match="worker run failed"):
        dispatch(envelope_event({}, {"t": 1}), lambda m, e: Failing())


def test_loader_returning_no_runner_is_a_type_error():
    with pytest.raises(TypeError, match="run"):
        dispatch(envelope_event({}, {"t": 1}), lambda m, e: object())


@pytest.mark.parametrize(
    "payload",
    [
        None,
        "a string",
        42,
        ["metadata", "params"],
        [{"metadata": {}, "params": 1}],
        {"not": "an envelope"},
        {"params": {"a": 1}},                                  # no metadata
        {"metadata": {"t": 1}},                                # no params
        {"metadata": "acme", "params": 1},                     # metadata not an object
        {"metadata": None, "params": 1},
        {"metadata": {"t": 1}, "params": 1, "extra": True},    # not exactly the envelope
    ],
)
def test_bare_payload_raises_missing_dispatcher_metadata(payload):
    loads = []
    with pytest.raises(MissingDispatcherMetadataError) as info:
        dispatch(bare_event(payload), lambda m, e: loads.append(m))
    assert loads == []  # the loader is never consulted
    assert isinstance(info.value, DynwfError) and isinstance(info.value, ValueError)
    assert "dispatcher envelope" in str(info.value)
    assert "wrap_workflow_binding" in str(info.value)


# --- inbound: create_dynamic_workflow_entrypoint ------------------------------------


def test_created_entrypoint_dispatches_with_its_env():
    seen = []

    def loader(metadata, env):
        seen.append((metadata, env))
        return RecordingRunner(metadata["tenant_id"])

    cls = create_dynamic_workflow_entrypoint(loader)
    assert issubclass(cls, WorkflowEntrypoint)
    assert cls.run is not WorkflowEntrypoint.run

    wf = cls(env={"K": "v"})
    result = asyncio.run(wf.run(envelope_event({"x": 1}, {"tenant_id": "acme"}), STEP))
    assert result == "acme"
    assert seen == [({"tenant_id": "acme"}, {"K": "v"})]

    with pytest.raises(MissingDispatcherMetadataError):
        asyncio.run(wf.run(bare_event({"x": 1}), STEP))


def test_created_entrypoint_survives_cloudpickle():
    # The engine stores a registered class with Ray's vendored cloudpickle (no Ray
    # runtime involved); a class made in a closure must round-trip with its loader.
    from ray import cloudpickle

    cls = cloudpickle.loads(cloudpickle.dumps(create_dynamic_workflow_entrypoint(
        lambda metadata, env: RecordingRunner(metadata["n"] * 2)
    )))
    assert asyncio.run(cls().run(envelope_event(None, {"n": 21}), STEP)) == 42


def test_create_dynamic_workflow_entrypoint_rejects_non_callable():
    with pytest.raises(TypeError):
        create_dynamic_workflow_entrypoint("not callable")


def test_round_trip_through_both_halves():
    fake = FakeBinding()
    wrap_workflow_binding(fake, {"tenant_id": "acme"}).create(id="wf-1", params={"n": 7})
    stored = fake.calls[0][1]["params"]
    runner = RecordingRunner()
    cls = create_dynamic_workflow_entrypoint(lambda m, e: runner)
    asyncio.run(cls().run(WorkflowEvent(payload=stored, timestamp=TS, instance_id="wf-1"), STEP))
    assert runner.seen[0][0].payload == {"n": 7}
