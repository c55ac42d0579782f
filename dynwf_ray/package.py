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
SHA-256. Before anything is stored (`push`), a Ray task in the tenant's runtime
env imports the code *inside a sandbox* (`host.check_entrypoint`: tenant code
never runs outside one, not even its import) to prove it imports and that the
class is a `WorkflowEntrypoint`. `publish` puts a stored package into Ray's
package store for a runtime env's working_dir; that store is only a cache of
the journal.

Registered classes (`Engine.register`) are the other kind of code: a cloudpickled
`WorkflowEntrypoint` subclass of the platform's own (`package_class`), loaded by
the sandbox runtime.
"""

from __future__ import annotations

import hashlib
import io
import os
import tomllib
import zipfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import cloudpickle

from .entrypoint import WorkflowEntrypoint
from .errors import InvalidInputError
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
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"{path}: not valid TOML: {exc}") from None
    except ValidationError as exc:
        raise InvalidInputError(f"{path}: {exc.errors()[0]['msg']}") from None


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
        if file.is_symlink() or any(p.is_symlink() for p in file.relative_to(directory).parents):
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


def runtime_env_for(manifest: Manifest, working_dir: str) -> dict[str, Any]:
    """The Ray runtime_env of a package published at working_dir (a URI)."""
    env: dict[str, Any] = {"working_dir": working_dir}
    if manifest.pip:
        env["pip"] = list(manifest.pip)
    if manifest.env:
        env["env_vars"] = dict(manifest.env)
    return env


def publish(blob: bytes, version: str) -> str:
    """Put a package into Ray's package store unless it is there; returns its URI.

    Ray takes local directories only for a whole job; an actor's working_dir
    must be a URI, so we upload our zip under a content-addressed gcs:// URI,
    as Ray does for job packages. The journal holds the package; this store is
    a cache that a cluster restart empties, and we refill it on demand. This is
    the one place we use a Ray-internal module.
    """
    from ray._private.runtime_env import packaging

    uri = f"gcs://_ray_pkg_dynwf_{version.removeprefix('v-')}.zip"
    if not packaging.package_exists(uri):
        packaging.upload_package_to_gcs(uri, blob)
    return uri


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


def _version(blob: bytes) -> str:
    return "v-" + hashlib.sha256(blob).hexdigest()[:32]  # 128 bits: same version = same content


# -- pushing -------------------------------------------------------------------

#: Longest a push waits for the tenant's runtime env (pip installs included).
PUSH_TIMEOUT = 900.0


def push(
    journal: Any, tenant_id: str, path: str | os.PathLike, now: float, sandbox_mode: str = "strict"
) -> str:
    """Build, validate (inside its own runtime env) and store a tenant's code; returns its version.

    Needs Ray to be initialized. Nothing is stored unless the code imports and
    its entrypoint is a WorkflowEntrypoint. Pushing the same content again (by
    any tenant) returns the same version without validating it again, and
    makes it that tenant's latest.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayTaskError, RuntimeEnvSetupError

    package = build_package(path)
    stored = journal.find_code(package.version)  # this content was validated before
    if stored is None:
        env = runtime_env_for(package.manifest, publish(package.blob, package.version))
        from .host import check_entrypoint

        check = ray.remote(num_cpus=0, max_retries=0)(check_entrypoint)
        try:
            entrypoint = ray.get(
                check.options(runtime_env=env).remote(
                    package.manifest.entrypoint, package.manifest.model_dump(), sandbox_mode
                ),
                timeout=PUSH_TIMEOUT,
            )
        except RayTaskError as exc:
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
    journal.save_code(tenant_id, package.version, PACKAGE, package.blob, now, manifest_json)
    return package.version
