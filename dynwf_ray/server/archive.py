"""Pushed code archives: a tenant's code directory uploaded as a zip or a (gzip'd) tarball.

`unpack` writes an archive's regular files under a fresh directory and returns the
code directory in it: the root, or the archive's one top folder when everything is
in one. It refuses, naming the member, anything that could write outside it or
is not plain code: absolute paths, `..`, links, devices; and stops once the files
exceed `EXPANSION` (8) times `limit` (or the archive's size, if larger) in all, so a
small archive cannot expand into a huge one."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO, Iterator

from ..errors import InvalidInputError

#: How much larger than the archive its unpacked files may be, in all.
EXPANSION = 8


def unpack(data: bytes, dest: Path, limit: int) -> Path:
    """Unpack `data` (zip or tar, gzip'd or not) under `dest`; the code directory."""
    budget = max(limit, len(data)) * EXPANSION
    if data[:4] == b"PK\x03\x04":
        members = _zip_members(data)
    else:
        try:
            archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InvalidInputError(f"the code archive is neither a zip nor a tarball: {exc}") from None
        members = _tar_members(archive)
    written = 0
    try:
        for name, source in members:
            path = _safe_path(name)
            if path is None:
                continue  # a directory entry
            target = dest.joinpath(*path.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as out:
                while chunk := source.read(1 << 16):
                    written += len(chunk)
                    if written > budget:
                        raise InvalidInputError(
                            f"the code archive unpacks to more than {budget} bytes"
                        )
                    out.write(chunk)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidInputError(f"the code archive is damaged: {exc}") from None
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise InvalidInputError("the code archive holds no files")
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest


def _safe_path(name: str) -> PurePosixPath | None:
    path = PurePosixPath(name)
    if name.endswith("/") or not path.parts:
        return None
    if path.is_absolute() or ".." in path.parts or "\\" in name or "\x00" in name:
        raise InvalidInputError(f"code archive member {name[:200]!r} would unpack outside its directory")
    return path


def _zip_members(data: bytes) -> Iterator[tuple[str, IO[bytes]]]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise InvalidInputError(f"the code archive is not a valid zip: {exc}") from None
    for info in archive.infolist():
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0: a zip without Unix modes
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise InvalidInputError(f"code archive member {info.filename[:200]!r} is not a plain file")
        with archive.open(info) as source:
            yield info.filename, source


def _tar_members(archive: tarfile.TarFile) -> Iterator[tuple[str, IO[bytes]]]:
    for member in archive:
        if member.isdir():
            yield member.name + "/", io.BytesIO()
            continue
        if not member.isfile():
            raise InvalidInputError(f"code archive member {member.name[:200]!r} is not a plain file")
        source = archive.extractfile(member)
        assert source is not None  # a regular file
        yield member.name, source
