"""Sandboxes on the engine: what the platform gives a tenant, and what a sandbox costs.

The hostile side (attacks that must fail) is in test_hostile.py; the jail alone in
test_jail.py; the protocol without Ray in test_supervisor.py.
"""

from __future__ import annotations

import os

import pytest

from dynwf_ray import InvalidInputError

from .conftest import wait_status
from .test_tenants import write_tenant
from .workflows import UsesEnv, counter_binding


@pytest.fixture(scope="module")
def env_engine(make_engine):
    return make_engine(bindings={"COUNTER": counter_binding})


def test_values_secrets_and_platform_bindings_reach_tenant_code(env_engine, tenant):
    engine = env_engine
    engine.register(tenant, UsesEnv)
    shown = engine.set_tenant_policy(
        tenant, env={"REGION": "eu-1"}, secrets={"API_KEY": "sk-live-0123456789"}
    )
    assert shown.secrets == {"API_KEY": "***"} and engine.tenant_policy(tenant).env == {"REGION": "eu-1"}
    out = wait_status(engine.binding(tenant).create(id="e"), "complete")["output"]
    assert out["region"] == "eu-1" and out["key_length"] == len("sk-live-0123456789")
    assert out["added"] == {"tenant": tenant, "value": 2}  # the factory got the tenant id
    assert out["private"] == "AttributeError"  # private methods are not even proxied
    assert out["missing"].startswith("DynwfError: binding 'COUNTER' has no method 'nope'")
    # What the platform's object raised reaches the tenant as a named error, nothing more.
    assert out["failing"] == "DynwfError: binding 'COUNTER': fail() raised ValueError: counter is read-only today"
    # The sandbox's environment holds nothing of the platform's.
    assert not [k for k in out["env"] if k.startswith(("RAY", "DYNWF", "OTEL", "PG"))], out["env"]
    lines = [line.message for line in engine.binding(tenant).get("e").logs()]
    assert "using key [secret]" in lines
    assert not any("sk-live" in line for line in lines)


def test_policy_input_is_validated_with_clear_errors(engine, tenant):
    with pytest.raises(InvalidInputError, match="egress entry 'nope'"):
        engine.set_tenant_policy(tenant, egress=["nope"])
    with pytest.raises(InvalidInputError, match="must be absolute"):
        engine.set_tenant_policy(tenant, paths={"relative/dir": "ro"})
    with pytest.raises(InvalidInputError, match="memory_mb"):
        engine.set_tenant_policy(tenant, limits={"memory_mb": 1})
    with pytest.raises(InvalidInputError, match="env name 'WORKFLOWS'"):
        engine.set_tenant_policy(tenant, env={"WORKFLOWS": "x"})


READS_SHADOW_AT_IMPORT = '''
from dynwf_ray import WorkflowEntrypoint

SECRET = open("/etc/shadow").read()  # runs at import: in a sandbox, even at push


class W(WorkflowEntrypoint):
    async def run(self, event, step):
        return SECRET
'''


def test_a_push_imports_tenant_code_only_inside_a_sandbox(engine, tenant, tmp_path):
    path = write_tenant(tmp_path, "shadow", READS_SHADOW_AT_IMPORT)
    with pytest.raises(InvalidInputError, match="does not import: PermissionError"):
        engine.push_tenant(tenant, str(path))
    assert engine.versions(tenant) == []  # nothing stored


def test_a_push_blames_the_node_not_the_code_when_no_sandbox_starts(engine, tenant, tmp_path, monkeypatch):
    # Seen on a container whose cgroup could not delegate: every push failed with an
    # InvalidInputError that named the tenant's code.
    import dynwf_ray.host
    from dynwf_ray import SandboxUnavailableError

    def no_sandbox(*_args):
        raise SandboxUnavailableError("sandbox could not start: cgroup: EBUSY")

    monkeypatch.setattr(dynwf_ray.host, "check_entrypoint", no_sandbox)
    path = write_tenant(tmp_path, "fine", READS_SHADOW_AT_IMPORT.replace('open("/etc/shadow").read()', '"x"'))
    with pytest.raises(SandboxUnavailableError, match=f"tenant '{tenant}': its code could not be checked: "
                                                      "sandbox could not start: cgroup: EBUSY") as caught:
        engine.push_tenant(tenant, str(path))
    assert not isinstance(caught.value, InvalidInputError)
    assert engine.versions(tenant) == []  # nothing stored


def test_process_mode_runs_tenant_code_without_the_kernel_jail(make_engine, engine, tenant):
    from .workflows import Confinement

    loose = make_engine(sandbox="process")
    loose.register(tenant, Confinement)
    out = wait_status(loose.binding(tenant).create(id="h"), "complete")["output"]
    # a sandbox process of its own (the host lists it, warm), with no seccomp filter
    sandboxes = [s["pid"] for h in loose.sandboxes() if h["tenant"] == tenant for s in h["sandboxes"]]
    assert out["pid"] in sandboxes and out["pid"] != os.getpid(), (out, sandboxes)
    assert out["seccomp"] == "0", out
    # the same code in the default (strict) sandbox runs under a seccomp filter
    engine.register(tenant, Confinement)
    strict = wait_status(engine.binding(tenant).create(id="h"), "complete")["output"]
    assert strict["seccomp"] == "2", strict  # a filter


def test_engine_sandboxes_lists_live_sandboxes_by_host(engine, tenant):
    from .workflows import Approval

    engine.register(tenant, Approval)
    inst = engine.binding(tenant).create(id="listed")
    wait_status(inst, "waiting")
    hosts = [h for h in engine.sandboxes() if h["tenant"] == tenant]
    assert len(hosts) == 1 and hosts[0]["started"] == 1
    assert [s["instance"] for s in hosts[0]["sandboxes"]] == [None]  # idle and warm
    inst.send_event("approval", {"by": "x"})
    wait_status(inst, "complete")


def test_a_push_refuses_a_symlink_that_leads_outside_the_tenant_directory(engine, tenant, tmp_path):
    from .workflows import Hello  # noqa: F401 - any valid code will do

    path = write_tenant(tmp_path, "linked", READS_SHADOW_AT_IMPORT.replace('open("/etc/shadow").read()', '"x"'))
    (path / "inside.py").symlink_to(path / "workflow.py")  # inside: stored as the file
    (path / "secret").symlink_to("/etc/shadow")
    with pytest.raises(InvalidInputError, match="secret is a symbolic link to '/etc/shadow'"):
        engine.push_tenant(tenant, str(path))
    (path / "secret").unlink()
    assert engine.push_tenant(tenant, str(path)).startswith("v-")
