"""What a server keeps in its --data-dir, and for how long.

- `DataDirLock`: one server per data dir. Two would interleave their logs and overwrite each
  other's snapshots (and the second would clean the first's scratch files at start).
- `clean_scratch`: at start, under the lock, files no live session can own: the disk KV tier of
  sessions a server left without closing them (kill -9, power loss; their snapshot and log hold
  the history, a resume builds a new tier), half-written snapshots, and set-aside old copies
  whose new snapshot is in place.
- `prune_closed`: snapshots and logs of sessions closed longer ago than --keep-closed. Each goes
  out of the way in one rename first, so a resume at that moment finds it whole or not at all.

Layout (see also server/wal.py): ``sessions/<id>/`` snapshots, ``wal/<id>.wal`` logs,
``kv-disk/`` the live sessions' disk KV tiers. Traces (--trace-dir) are the user's and stay.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows; the lock is then advisory only by this note
    fcntl = None

LOCK_NAME = "server.lock"
PRUNED = ".pruned-"
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_keep(value: str) -> float | None:
    """``--keep-closed``: ``7d``, ``12h``, ``30m``, ``90s`` or plain seconds; ``forever`` -> None."""
    text = str(value).strip().lower()
    if text == "forever":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([smhd]?)", text)
    if not match:
        raise ValueError(
            f"--keep-closed must be a duration like 7d, 12h, 30m, 90s (or seconds), or 'forever'; got {value!r}"
        )
    return float(match.group(1)) * _UNITS_S[match.group(2) or "s"]


class DataDirLock:
    """An exclusive lock on ``<data_dir>/server.lock`` for the life of a server (released by
    the kernel if the process dies)."""

    def __init__(self, data_dir: Path):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / LOCK_NAME
        self._file = open(self.path, "a+")  # noqa: SIM115 - held open until release()
        if fcntl is None:
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise ValueError(
                f"--data-dir {data_dir} is in use by another vrex serve ({holder}); give each server "
                "its own data dir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing drops the flock


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def delete(paths: list[Path]) -> int:
    """Delete files and folders; the bytes they held."""
    freed = 0
    for path in paths:
        try:
            freed += _size(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
    return freed


def clean_scratch(data_dir: Path) -> dict:
    """Remove what no session owns; call at start, with the lock held and no session open."""
    doomed = list((data_dir / "kv-disk").glob("*"))
    sessions = data_dir / "sessions"
    doomed += list(sessions.glob(".*.tmp-*"))  # a snapshot a crash cut short: the old one stands
    doomed += list(sessions.glob(f".*{PRUNED}*"))  # a prune a crash cut short
    for old in sessions.glob(".*.old-*"):  # the set-aside copy is needed only without its target
        target = sessions / old.name[1:].split(".old-")[0]
        if target.exists():
            doomed.append(old)
    wal_dir = data_dir / "wal"
    doomed += list(wal_dir.glob(f"*{PRUNED}*"))
    return {"paths": len(doomed), "bytes": delete(doomed)}


def _saved_ids(sessions: Path) -> set[str]:
    """Ids with a snapshot: its folder, or only the copy a crash mid-swap set aside."""
    ids = {p.name for p in sessions.glob("[!.]*")}
    for old in sessions.glob(".*.old-*"):
        if PRUNED not in old.name:
            ids.add(old.name[1:].split(".old-")[0])
    return ids


def _last_change_s(data_dir: Path, session_id: str) -> float | None:
    """When the session last changed on disk: its newest snapshot or log write."""
    sessions = data_dir / "sessions"
    candidates = [
        sessions / session_id / "session.json",
        sessions / session_id,
        *sessions.glob(f".{session_id}.old-*"),
        *(data_dir / "wal").glob(f"{session_id}.wal*"),
    ]
    times = []
    for path in candidates:
        try:
            times.append(path.stat().st_mtime)
        except FileNotFoundError:
            continue
    return max(times, default=None)


def expired(data_dir: Path, keep_s: float, busy: set[str], now_s: float | None = None) -> list[str]:
    """Ids of saved sessions, none of them in ``busy``, unchanged on disk (snapshot and log) for
    longer than ``keep_s``."""
    now_s = time.time() if now_s is None else now_s
    out = []
    for session_id in sorted(_saved_ids(data_dir / "sessions") - busy):
        changed_s = _last_change_s(data_dir, session_id)
        if changed_s is not None and now_s - changed_s > keep_s:
            out.append(session_id)
    return out


def set_aside(data_dir: Path, session_id: str) -> list[Path]:
    """Rename a session's snapshot (and its set-aside copies) and log out of the way; fast, so
    it runs while no restore can start. Returns what `delete` deletes."""
    tag = f"{PRUNED}{uuid.uuid4().hex[:8]}"
    sessions, wal_dir = data_dir / "sessions", data_dir / "wal"
    moved = []
    for path in [
        sessions / session_id,
        *sessions.glob(f".{session_id}.old-*"),
        *wal_dir.glob(f"{session_id}.wal*"),
    ]:
        if not path.exists():
            continue
        hidden = path.name if path.name.startswith(".") else f".{path.name}"
        target = path.with_name(f"{hidden}{tag}")
        os.rename(path, target)
        moved.append(target)
    return moved
