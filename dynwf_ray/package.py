"""Tenant code packages: what a tenant pushes, how it is versioned, checked and unpacked.

A tenant is a directory of plain Python with an optional `dynwf.toml`:

    entrypoint = "workflow:OrderWorkflow"   # module[:Class]; default "workflow"
    pip = ["humanize>=4"]                   # installed into the tenant's runtime env
    [env]
    GREETING = "hello"                      # environment variables of its processes

Without `:Class`, the module must define exactly one `WorkflowEntrypoint`
subclass. `build_package` zips the directory deterministically (sorted paths,
fixed timestamps, no caches or hidden files), so the same content always gives
the same bytes and the same version: `v-` + the first 32 hex digits of its
SHA-256. A host unpacks a stored version into a directory of its own on its node
(`unpack`); the code never becomes part of a trusted process's Ray runtime env
(which would put it on that process's import path). Before anything is stored
(`push`), a Ray task in the tenant's runtime env (its pip packages, if the
platform allowed pip) imports the code *inside a sandbox* (`host.check_entrypoint`:
tenant code never runs outside one, not even its import) to prove it imports and
that the class is a `WorkflowEntrypoint`.

Registered classes (`Engine.register`) are the other kind of code: a cloudpickled
`WorkflowEntrypoint` subclass of the platform's own (`package_class`), loaded by
the sandbox runtime.
"""

from __future__ import annotations

import hashlib
import json
import io
import os
import pickletools
import shutil
import tempfile
import tomllib
import zipfile
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import cloudpickle

from .entrypoint import WorkflowEntrypoint
from .errors import InvalidInputError, SandboxUnavailableError, invalid
from .sandbox.runtime import check_class

PICKLED_CLASS = "pickled-class"
PACKAGE = "package"
MANIFEST_FILE = "dynwf.toml"
MAX_PACKAGE_BYTES = 64 * 1024 * 1024
_SKIP_DIRS = {"__pycache__", ".git", ".venv", "venv", "node_modules"}
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


class Manifest(BaseModel):
    """The validated content of `dynwf.toml` (entrypoint resolved to module:Class at push)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    entrypoint: str = "workflow"
    pip: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("pip")
    @classmethod
    def _pip(cls, v: list[str]) -> list[str]:
        from packaging.requirements import InvalidRequirement, Requirement

        for item in v:
            try:
                requirement = Requirement(item)
            except InvalidRequirement as exc:
                raise ValueError(f"pip requirement {item!r} is not a requirement: {exc}") from None
            if requirement.url or item.lstrip().startswith("-"):
                raise ValueError(
                    f"pip requirement {item!r}: only names with versions from the package "
                    "index are allowed (no URLs, paths or options)"
                )
        return v

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, v: str) -> str:
        module, _, name = v.partition(":")
        if not module or not all(p.isidentifier() for p in module.split(".")):
            raise ValueError(f"entrypoint {v!r} must be 'module' or 'module:Class'")
        if name and not name.isidentifier():
            raise ValueError(f"entrypoint {v!r}: {name!r} is not a class name")
        return v


class Package(BaseModel):
    """A built package: the zip, its manifest and its content-derived version."""

    model_config = ConfigDict(frozen=True)
    version: str
    manifest: Manifest
    blob: bytes


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_FILE
    if not path.exists():
        return Manifest()
    try:
        return Manifest(**tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except ValidationError as exc:
        raise invalid(str(path), exc) from None


def build_package(path: str | os.PathLike) -> Package:
    """Zip a tenant directory deterministically and derive its version."""
    directory = Path(path)
    if not directory.is_dir():
        raise InvalidInputError(f"tenant code path {str(path)!r} is not a directory")
    manifest = read_manifest(directory)
    files = sorted(
        p for p in directory.rglob("*")
        if p.is_file()
        and not any(part in _SKIP_DIRS or part.startswith(".") for part in p.relative_to(directory).parts)
        and p.suffix not in (".pyc", ".pyo")
    )
    root = directory.resolve()
    for file in files:
        if file.is_symlink() or any(
            (directory / p).is_symlink() for p in file.relative_to(directory).parents
        ):
            target = file.resolve()
            if target != root and root not in target.parents:
                raise InvalidInputError(
                    f"tenant code at {str(path)!r}: {file.relative_to(directory).as_posix()} is a "
                    f"symbolic link to {str(target)!r}, outside the tenant's directory"
                )
    if not any(f.suffix == ".py" for f in files):
        raise InvalidInputError(f"tenant code path {str(path)!r} contains no Python file")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in files:
            info = zipfile.ZipInfo(file.relative_to(directory).as_posix(), date_time=_FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, file.read_bytes())
    blob = buffer.getvalue()
    if len(blob) > MAX_PACKAGE_BYTES:
        raise InvalidInputError(
            f"tenant code at {str(path)!r} is {len(blob)} bytes zipped; the limit is "
            f"{MAX_PACKAGE_BYTES} bytes"
        )
    return Package(version=_version(blob), manifest=manifest, blob=blob)


def with_entrypoint(package: Package, entrypoint: str) -> Package:
    """The package with its entrypoint resolved to module:Class (stored that way)."""
    manifest = package.manifest.model_copy(update={"entrypoint": entrypoint})
    return package.model_copy(update={"manifest": manifest})


def runtime_env_for(manifest: Manifest) -> dict[str, Any] | None:
    """The Ray runtime_env of a package's trusted processes (its hosts, its validation):
    its pip requirements only, installed as binary wheels (no package's build code
    runs). The code itself and its `[env]` are not in it: Ray would put the code on
    those processes' import path (a `sitecustomize.py` would run there) and the
    variables in their environment. Hosts unpack the code themselves (`unpack`) for
    their sandboxes, and give the `[env]` to the sandboxes only."""
    if not manifest.pip:
        return None
    return {"pip": {"packages": list(manifest.pip), "pip_install_options": ["--only-binary", ":all:"]}}


#: Where hosts unpack code versions for their sandboxes (one directory per version).
CODE_ROOT = os.path.join(tempfile.gettempdir(), "dynwf-code")


def unpack(version: str, blob: bytes) -> str:
    """The directory holding a package version's files on this node, unpacked once
    (content-addressed, written under a temporary name and renamed into place)."""
    target = os.path.join(CODE_ROOT, version)
    if os.path.isdir(target):
        return target
    os.makedirs(CODE_ROOT, mode=0o700, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{version}-", dir=CODE_ROOT)
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        for name in zf.namelist():
            parts = Path(name).parts
            if not parts or Path(name).is_absolute() or ".." in parts:
                raise InvalidInputError(f"code version {version!r}: bad path {name!r} in its zip")
        zf.extractall(staging)
    try:
        os.rename(staging, target)
    except OSError:  # another host of this version won the race: use its copy
        shutil.rmtree(staging, ignore_errors=True)
    return target


# -- registered classes ------------------------------------------------------


def package_class(cls: Any) -> tuple[str, str, bytes]:
    """(version, kind, blob) for a workflow class registered directly."""
    if not (isinstance(cls, type) and issubclass(cls, WorkflowEntrypoint)):
        raise InvalidInputError(
            f"workflow class must be a subclass of WorkflowEntrypoint, got {cls!r}"
        )
    check_class(cls, cls.__qualname__)
    blob = cloudpickle.dumps(cls)
    return _version(blob), PICKLED_CLASS, blob


def pickled_modules(blob: bytes) -> list[str]:
    """The top-level modules a pickle refers to (read with pickletools: nothing in it
    runs). A sandbox must be able to import them to load a registered class."""
    memo: dict[int, Any] = {}
    pushed: list[Any] = []  # what each opcode pushed: a string, or None for anything else
    modules: set[str] = set()
    for op, arg, _ in pickletools.genops(blob):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            pushed.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif op.name == "STACK_GLOBAL":
            if len(pushed) >= 2 and isinstance(pushed[-2], str):
                modules.add(pushed[-2].split(".")[0])
            pushed.append(None)
        elif op.name in ("GLOBAL", "INST"):
            modules.add(str(arg).split(" ")[0].split(".")[0])
            pushed.append(None)
        else:
            pushed.append(None)
    return sorted(modules)


def _version(blob: bytes) -> str:
    return "v-" + hashlib.sha256(blob).hexdigest()[:32]  # 128 bits: same version = same content


# -- pushing -------------------------------------------------------------------

#: Longest a push waits for the tenant's runtime env (pip installs included).
PUSH_TIMEOUT = 900.0


def check_pip_allowed(tenant_id: str, manifest: Manifest, policy: dict[str, Any]) -> None:
    """pip requirements make the platform download and install packages: only a tenant
    the platform allowed (`set_tenant_policy(..., pip=True)`) may ask for them."""
    if not manifest.pip:
        return
    if not policy.get("pip"):
        raise InvalidInputError(
            f"tenant {tenant_id!r} asks for pip packages {manifest.pip}, but the platform "
            "has not allowed pip for it (engine.set_tenant_policy(tenant, pip=True))"
        )


def push(
    journal: Any, tenant_id: str, path: str | os.PathLike, now: float, sandbox_mode: str = "strict",
    progress: Callable[[str], None] | None = None,
) -> str:
    """Build, validate (inside its own runtime env) and store a tenant's code; returns its version.

    Needs Ray to be initialized. Nothing is stored unless the code imports and
    its entrypoint is a WorkflowEntrypoint. Pushing the same content again (by
    any tenant) returns the same version without validating it again, and
    makes it that tenant's latest. `progress` is told each stage as it begins.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayTaskError, RuntimeEnvSetupError

    stage = progress or (lambda _: None)
    stage("packaging")
    package = build_package(path)
    check_pip_allowed(tenant_id, package.manifest, json.loads(journal.tenant_policy(tenant_id) or "{}"))
    stored = journal.find_code(package.version)  # this content was validated before
    if stored is None:
        from .host import check_entrypoint

        check = ray.remote(num_cpus=0, max_retries=0)(check_entrypoint)
        env = runtime_env_for(package.manifest)
        pip = f" (installing {', '.join(package.manifest.pip)})" if package.manifest.pip else ""
        stage(f"validating in its runtime env{pip}")
        try:
            entrypoint = ray.get(
                check.options(**({"runtime_env": env} if env else {})).remote(
                    package.version, package.blob, package.manifest.model_dump(), sandbox_mode
                ),
                timeout=PUSH_TIMEOUT,
            )
        except RayTaskError as exc:
            if isinstance(exc.cause, SandboxUnavailableError):  # the node's fault, not the code's
                raise SandboxUnavailableError(
                    f"tenant {tenant_id!r}: its code could not be checked: {exc.cause}") from None
            cause = exc.cause if isinstance(exc.cause, InvalidInputError) else exc
            raise InvalidInputError(f"tenant {tenant_id!r} code at {str(path)!r}: {cause}") from None
        except RuntimeEnvSetupError as exc:
            raise InvalidInputError(
                f"tenant {tenant_id!r}: its runtime env could not be built "
                f"(pip {package.manifest.pip}): {str(exc).strip().splitlines()[-1]}"
            ) from None
        except GetTimeoutError:
            raise InvalidInputError(
                f"tenant {tenant_id!r}: validating its code took longer than {PUSH_TIMEOUT:g} s"
            ) from None
        package = with_entrypoint(package, entrypoint)
        manifest_json = package.manifest.model_dump_json()
    else:
        manifest_json = stored[2]
    stage("storing")
    journal.save_code(tenant_id, package.version, PACKAGE, package.blob, now, manifest_json)
    return package.version
