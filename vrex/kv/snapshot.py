"""Atomic snapshot folders with sha256 checksums, shared by the KV store and the session snapshot.

A snapshot is written into a temp folder beside the target and renamed into place only once every
file is written and fsynced, so a crash mid-write leaves the previous snapshot untouched.
`manifest.json` lists the sha256 and size of every other file; `verify_manifest` checks them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MANIFEST_NAME = "manifest.json"


class SnapshotError(ValueError):
    """A snapshot folder is missing, incomplete or corrupted."""


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: str | os.PathLike, format_name: str) -> dict:
    """Checksum every file under `folder` (recursively) into `folder/manifest.json`; fsync them all."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        _fsync(path)
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"format": format_name, "files": files}
    manifest_path = folder / MANIFEST_NAME
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _fsync(manifest_path)
    return manifest


def verify_manifest(folder: str | os.PathLike, format_name: str | None = None) -> dict:
    """Check every file listed in the manifest; return the manifest.

    Raises:
        SnapshotError: naming the folder and the first missing or mismatching file.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise SnapshotError(f"{folder} is not a snapshot: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SnapshotError(f"{manifest_path} is unreadable ({err}); the snapshot is corrupted") from None
    if format_name is not None and manifest.get("format") != format_name:
        raise SnapshotError(f"{folder} holds a {manifest.get('format')!r} snapshot, expected {format_name!r}")
    for rel, entry in files.items():
        path = folder / rel
        if not path.is_file():
            raise SnapshotError(f"snapshot {folder} is incomplete: {rel} is missing")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise SnapshotError(
                f"snapshot {folder} is corrupted: checksum of {rel} does not match the manifest "
                "(the file changed after the snapshot was written)"
            )
    return manifest


def _backups(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder; on normal exit it replaces `target`, on error it is removed.

    The swap is two renames (old target aside, temp into place) and then the old one is deleted;
    `resolve_snapshot_folder` finds the set-aside copy if a crash fell between the two renames.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(target, backup)
    os.rename(tmp, target)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    for leftover in _backups(target):  # set aside by an earlier swap a crash interrupted
        shutil.rmtree(leftover, ignore_errors=True)


def resolve_snapshot_folder(target: str | os.PathLike) -> Path:
    """The folder to restore from: `target`, or the set-aside copy a crash mid-swap left behind."""
    target = Path(target)
    if target.exists():
        return target
    backups = _backups(target)
    if backups:
        return backups[-1]
    raise SnapshotError(f"no snapshot at {target}")
