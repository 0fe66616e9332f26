"""Write-ahead log (WAL) of acknowledged frames and answers: one append-only file per session.

Why: a full snapshot copies the whole KV store, which grows with the history, so taking one
before every frame's ack gets slower the longer a stream runs. With the log, an ack is made
durable by appending the frame's original message (a JPEG is a few KB) and fdatasync-ing the
file; full snapshots are taken every `snapshot_every_frames` logged records or
`snapshot_interval_s` seconds, and the log is emptied after each one.

On resume: restore the latest snapshot, then replay the logged records in order through the
engine (`Session.replay_frame` / `replay_answer`). Only accepted frames are logged, so the
sampler sees the same sequence again and keeps every one of them. Replay is idempotent: a record
the snapshot already holds (a crash after a snapshot but before the log was emptied) is skipped
by the engine, which compares the record's frame index / answer index with its restored counters.

File format (little-endian):

    file header   b"VREXWAL1"
    record        b"VR" | u32 body length | u32 crc32(body) | body
    body          u32 meta length | meta (UTF-8 JSON) | payload

Record kinds:
    frame   meta {"kind": "frame", "frame_index", "timestamp_s"}; payload: the vrex.v1.Frame
            message as received (encoded image bytes or raw RGB), decoded again on replay.
    answer  meta {"kind": "answer", "answer_index", "question", "token_ids"}; no payload.
            `token_ids` are the answer tokens the engine fed back into the history.

A record cut short, or whose checksum fails, ends the log when nothing whole follows it: it is a
torn write from a crash. It was never acknowledged (acks follow the fsync), and it is cut off
when the log is next opened (the cut bytes are kept beside the log, `<log>.torn-<ns>`). A bad
record with whole records after it is not a torn write but damage: reading the log fails
(the session's resume answers DATA_LOSS) and the file is left as it is.

Answers in flight: an answer's record is appended after its last token is generated and before
`answer_done` is sent. An answer cut off by a crash has no record, so after the restart the
history is as it was before that question; the client never got `answer_done` and asks again.
An answer that fails after its question was prefilled closed its turn in the engine (its tokens
stay in the history), so it is logged too, before the error is sent.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

FILE_HEADER = b"VREXWAL1"
RECORD_MAGIC = b"VR"
_RECORD_HEAD = struct.Struct("<2sII")  # magic, body length, crc32(body)
_META_LEN = struct.Struct("<I")
# A record larger than this is garbage (frames are capped far below by the server limits).
MAX_RECORD_BYTES = 1 << 30


@dataclass(frozen=True)
class WalRecord:
    kind: str  # "frame" | "answer"
    meta: dict = field(default_factory=dict)
    payload: bytes = b""

    def encode(self) -> bytes:
        meta = json.dumps({**self.meta, "kind": self.kind}, separators=(",", ":")).encode()
        body = _META_LEN.pack(len(meta)) + meta + self.payload
        return _RECORD_HEAD.pack(RECORD_MAGIC, len(body), zlib.crc32(body)) + body


def frame_record(frame_bytes: bytes, frame_index: int, timestamp_s: float) -> WalRecord:
    return WalRecord(
        "frame", {"frame_index": int(frame_index), "timestamp_s": float(timestamp_s)}, frame_bytes
    )


def answer_record(question: str, token_ids: list[int], answer_index: int) -> WalRecord:
    meta = {"answer_index": int(answer_index), "question": question, "token_ids": [int(t) for t in token_ids]}
    return WalRecord("answer", meta)


@dataclass(frozen=True)
class LogContents:
    records: list[WalRecord]
    good_bytes: int  # file offset just after the last whole record
    torn_bytes: int  # bytes after it: a torn write (0 when the log ends cleanly)


def read_log(path: str | Path) -> LogContents:
    """Every whole record of the log at `path`, in order; a torn tail is reported, not raised.

    Raises:
        ValueError: the file is not a vrex write-ahead log (wrong header), or a record is
            damaged and whole records follow it (acknowledged ones: not a torn write).
    """
    data = Path(path).read_bytes()
    if len(data) < len(FILE_HEADER):
        # a crash while the header itself was written: an empty log
        return LogContents([], 0, len(data))
    if not data.startswith(FILE_HEADER):
        raise ValueError(f"{path} is not a vrex write-ahead log (header {data[:8]!r}); move it away")
    records: list[WalRecord] = []
    offset = len(FILE_HEADER)
    while offset < len(data):
        record = _decode_at(data, offset)
        if record is None:
            break
        records.append(record[0])
        offset = record[1]
    later = _whole_record_after(data, offset)
    if later is not None:
        raise ValueError(
            f"{path}: the record at byte {offset} is damaged but a whole record follows at byte {later}: "
            f"not a torn write, so acknowledged records would be lost ({len(records)} read before it); "
            "the log is left as it is: move it away to resume from the snapshot alone"
        )
    return LogContents(records, offset, len(data) - offset)


def _whole_record_after(data: bytes, offset: int) -> int | None:
    """Offset of the first whole record that starts after `offset`, if any."""
    at = data.find(RECORD_MAGIC, offset + 1)
    while at != -1:
        if _decode_at(data, at) is not None:
            return at
        at = data.find(RECORD_MAGIC, at + 1)
    return None


def _decode_at(data: bytes, offset: int) -> tuple[WalRecord, int] | None:
    """The record at `offset` and the offset after it, or None when it is torn or corrupt."""
    head_end = offset + _RECORD_HEAD.size
    if head_end > len(data):
        return None
    magic, length, crc = _RECORD_HEAD.unpack_from(data, offset)
    if magic != RECORD_MAGIC or length < _META_LEN.size or length > MAX_RECORD_BYTES:
        return None
    end = head_end + length
    if end > len(data):
        return None
    body = data[head_end:end]
    if zlib.crc32(body) != crc:
        return None
    (meta_len,) = _META_LEN.unpack_from(body, 0)
    if _META_LEN.size + meta_len > len(body):
        return None
    try:
        meta = json.loads(body[_META_LEN.size : _META_LEN.size + meta_len])
        kind = meta.pop("kind")
    except (ValueError, KeyError, TypeError):
        return None
    return WalRecord(str(kind), meta, bytes(body[_META_LEN.size + meta_len :])), end


def _sync(fd: int) -> None:
    # fdatasync skips the inode's timestamps; the size change it still flushes
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform; the file itself is synced
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteAheadLog:
    """An open log for appending (appends run in a worker thread; a lock keeps an append that
    outlives its cancelled caller from interleaving with a truncate or close).

    Opening an existing log reads it (see `recovered`) and cuts off a torn tail, so new records
    never follow garbage.

    Args:
        path: the log file; its folder is created.
        sync: fdatasync after every append (False only for benchmarks and tests of the format).
    """

    def __init__(self, path: str | Path, sync: bool = True):
        self.path = Path(path)
        self.sync = sync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        existed = self.path.exists()
        self.recovered = read_log(self.path) if existed else LogContents([], 0, 0)
        self._file = open(self.path, "r+b" if existed else "w+b")  # noqa: SIM115 (kept open)
        if self.recovered.good_bytes < len(FILE_HEADER):
            self._reset()
        else:
            if self.recovered.torn_bytes:
                self._keep_torn_tail()
                self._file.truncate(self.recovered.good_bytes)
                _sync(self._file.fileno())
            self._file.seek(self.recovered.good_bytes)
        if not existed:  # the new directory entry must survive a crash too
            _sync_dir(self.path.parent)
            _sync_dir(self.path.parent.parent)
        self.num_records = len(self.recovered.records)
        self.num_bytes = self._file.tell()

    def _keep_torn_tail(self) -> None:
        """Keep the bytes about to be cut beside the log: a torn write is never an acked
        record, but a wrong guess must not destroy anything."""
        self._file.seek(self.recovered.good_bytes)
        tail = self._file.read()
        aside = self.path.with_name(f"{self.path.name}.torn-{time.time_ns()}")
        aside.write_bytes(tail)
        _sync_dir(self.path.parent)

    def _reset(self) -> None:
        self._file.seek(0)
        self._file.truncate(0)
        self._file.write(FILE_HEADER)
        self._file.flush()
        _sync(self._file.fileno())

    def append(self, record: WalRecord) -> int:
        """Append one record and (with `sync`) make it durable; returns its size in bytes."""
        data = record.encode()
        with self._lock:
            if self._file.closed:
                raise ValueError(f"write-ahead log {self.path} is closed")
            try:
                self._file.write(data)
                self._file.flush()
                if self.sync:
                    _sync(self._file.fileno())
            except OSError:
                self._undo_partial_append()
                raise
            self.num_records += 1
            self.num_bytes += len(data)
        return len(data)

    def _undo_partial_append(self) -> None:
        """Cut what a failed append wrote (a full disk can take part of a record), so the next
        record does not follow garbage; if even that fails, reopening treats it as a torn tail."""
        try:
            self._file.seek(self.num_bytes)
            self._file.truncate(self.num_bytes)
        except (OSError, ValueError):
            pass

    def truncate(self) -> None:
        """Empty the log: call after a snapshot that holds every logged record."""
        with self._lock:
            if self._file.closed:
                return
            self._reset()
            self.num_records = 0
            self.num_bytes = len(FILE_HEADER)

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wal_path(data_dir: str | Path, session_id: str) -> Path:
    """Where a session's log lives: <data-dir>/wal/<session id>.wal."""
    return Path(data_dir) / "wal" / f"{session_id}.wal"


@dataclass
class ReplayReport:
    frames_replayed: int = 0
    answers_replayed: int = 0
    records_skipped: int = 0  # already held by the snapshot
    torn_bytes: int = 0


async def replay(backend, session, contents: LogContents) -> ReplayReport:
    """Feed the logged records of `contents` through the engine, in order, after a restore.

    Raises:
        ValueError: a record does not fit the restored session (the log belongs elsewhere).
    """
    from server.config import Limits
    from server.images import decode_frame
    from vrex.api import vrex_pb2 as pb

    # The frames passed the server's limits when they were accepted; decode them whatever the
    # limits of this run are.
    limits = Limits(
        max_frame_bytes=1 << 30, max_frame_pixels=1 << 40, max_message_bytes=(1 << 30) + (1 << 20)
    )
    report = ReplayReport(torn_bytes=contents.torn_bytes)
    for record in contents.records:
        meta = record.meta
        if record.kind == "frame":
            image = decode_frame(pb.Frame.FromString(record.payload), limits)
            done = await backend.replay_frame(
                session, image, float(meta["timestamp_s"]), int(meta["frame_index"])
            )
            report.frames_replayed += bool(done)
        elif record.kind == "answer":
            done = await backend.replay_answer(
                session, str(meta["question"]), [int(t) for t in meta["token_ids"]], int(meta["answer_index"])
            )
            report.answers_replayed += bool(done)
        else:
            raise ValueError(f"unknown write-ahead log record kind {record.kind!r}")
        report.records_skipped += not done
    return report
