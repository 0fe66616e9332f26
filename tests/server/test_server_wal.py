"""The write-ahead log: record format, torn tails, snapshot + truncation, replay, and kill -9 of a
real `vrex serve` process right after acks (fake engine, and the real engine as a slow test)."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from server import wal
from vrex.api import vrex_pb2 as pb
from vrex.client import Client, encode_image


def image(seed: int = 0, width: int = 64, height: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _frame_bytes(seed: int, ts: float) -> bytes:
    return pb.Frame(encoded=encode_image(image(seed), "png"), timestamp_s=ts).SerializeToString()


# ---------------------------------------------------------------------------- the format


def test_records_round_trip_and_truncate(tmp_path):
    path = tmp_path / "wal" / "s.wal"
    records = [
        wal.frame_record(_frame_bytes(0, 0.0), 0, 0.0),
        wal.answer_record("what is this?", [5, 6, 7], 0),
        wal.frame_record(_frame_bytes(1, 1.0), 3, 1.0),
    ]
    with wal.WriteAheadLog(path) as log:
        sizes = [log.append(r) for r in records]
        assert log.num_records == 3 and log.num_bytes == len(wal.FILE_HEADER) + sum(sizes)
    contents = wal.read_log(path)
    assert contents.records == records and contents.torn_bytes == 0
    assert contents.records[1].meta == {
        "answer_index": 0,
        "question": "what is this?",
        "token_ids": [5, 6, 7],
    }
    with wal.WriteAheadLog(path) as log:  # reopening keeps what is there and appends after it
        assert log.recovered.records == records
        log.truncate()
        assert log.num_records == 0
        log.append(records[0])
    assert wal.read_log(path).records == records[:1]
    assert path.stat().st_size == len(wal.FILE_HEADER) + sizes[0]


def test_torn_last_record_is_ignored_at_every_cut(tmp_path):
    path = tmp_path / "s.wal"
    first = wal.frame_record(b"x" * 100, 0, 0.0)
    second = wal.answer_record("q", [1, 2], 0)
    with wal.WriteAheadLog(path) as log:
        log.append(first)
    whole = path.read_bytes()
    tail = second.encode()
    for cut in range(len(tail)):  # a crash part-way through writing the second record
        path.write_bytes(whole + tail[:cut])
        contents = wal.read_log(path)
        assert contents.records == [first] and contents.torn_bytes == cut
        with wal.WriteAheadLog(path) as log:  # opening cuts the torn tail off, then appends cleanly
            log.append(second)
        assert wal.read_log(path).records == [first, second]
    # what was cut is kept beside the log, never destroyed
    kept = sorted(tmp_path.glob("s.wal.torn-*"))
    assert [k.read_bytes() for k in kept] == [tail[:cut] for cut in range(1, len(tail))]


def test_a_damaged_record_before_whole_ones_is_an_error_and_the_log_stays(tmp_path):
    """One flipped byte in the first of four records: the three after it were acknowledged,
    so this is damage, not a torn write; nothing may be cut (it was, silently)."""
    path = tmp_path / "s.wal"
    records = [wal.frame_record(bytes(range(200)), i, float(i)) for i in range(4)]
    with wal.WriteAheadLog(path) as log:
        for r in records:
            log.append(r)
    data = bytearray(path.read_bytes())
    data[len(wal.FILE_HEADER) + 30] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged but a whole record follows"):
        wal.read_log(path)
    with pytest.raises(ValueError, match="damaged"):
        wal.WriteAheadLog(path)
    assert path.read_bytes() == bytes(data) and not list(tmp_path.glob("*.torn-*"))


def test_checksum_and_garbage_end_the_log(tmp_path):
    path = tmp_path / "s.wal"
    records = [wal.frame_record(bytes(range(200)), i, float(i)) for i in range(3)]
    with wal.WriteAheadLog(path) as log:
        for r in records:
            log.append(r)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # a flipped bit in the last record's payload
    path.write_bytes(bytes(data))
    assert wal.read_log(path).records == records[:2]
    # a length field that points past the end (a torn header) and plain garbage
    path.write_bytes(bytes(data[: -len(records[2].encode())]) + struct.pack("<2sII", b"VR", 1 << 20, 0))
    assert wal.read_log(path).records == records[:2]
    path.write_bytes(wal.FILE_HEADER + b"garbage!")
    assert wal.read_log(path).records == []
    path.write_bytes(b"VREX")  # a crash while the header itself was written
    with wal.WriteAheadLog(path) as log:
        assert log.recovered.records == []
    assert path.read_bytes() == wal.FILE_HEADER
    path.write_bytes(b"not a log at all")
    with pytest.raises(ValueError, match="not a vrex write-ahead log"):
        wal.read_log(path)


# ---------------------------------------------------------------------------- in-process server


def _snapshot_state(data_dir: Path, session_id: str) -> dict:
    return json.loads((data_dir / session_id / "state.json").read_text())


async def test_acks_go_to_the_log_and_snapshots_empty_it(serve, tmp_path):
    data = tmp_path / "data"
    server, client = await serve(data_dir=data, snapshot_every_frames=3, snapshot_interval_s=0)
    async with client.session(fps=1.0) as s:
        path = wal.wal_path(data, s.session_id)
        assert _snapshot_state(data, s.session_id)["frames_accepted"] == 0  # the base snapshot
        for i in range(2):
            assert (await s.send_frame(image(i), float(i), wait=True)).accepted
        # two acks: both in the log, none in a snapshot yet
        assert [r.meta["frame_index"] for r in wal.read_log(path).records] == [0, 1]
        assert _snapshot_state(data, s.session_id)["frames_accepted"] == 0
        await s.send_frame(image(2), 2.0, wait=True)  # the third record: a snapshot after its ack
        for _ in range(100):
            stats = await s.stats()
            if stats.extra["wal_records"] == 0:
                break
            await asyncio.sleep(0.02)
        assert wal.read_log(path).records == [] and stats.extra["wal_records"] == 0
        assert _snapshot_state(data, s.session_id)["frames_accepted"] == 3
        for i in range(3, 7):
            await s.send_frame(image(i), float(i), wait=True)
        answer = await s.ask_text("how many?", max_new_tokens=4)
        assert answer.num_tokens == 4
        kinds = [r.kind for r in wal.read_log(path).records]
        assert kinds == ["frame", "answer"]  # 3 + 3 frames snapshotted, then a frame and the answer
        assert _snapshot_state(data, s.session_id)["frames_accepted"] == 6
    assert wal.read_log(path).records == []  # closing snapshots and empties the log


async def test_a_full_disk_withholds_acks_until_a_snapshot_holds_everything(serve, tmp_path, monkeypatch):
    """The log cannot take frame 2 (disk full) and neither can a snapshot: frame 2 gets
    RESOURCE_EXHAUSTED, no ack, though the session holds it. Once the disk has room, frame 3's
    ack comes with a full snapshot holding frames 0-3; the log never skips a record (frame 2
    missing from it would replay another history than the live one)."""
    from server import backend as backend_module

    data = tmp_path / "data"
    server, client = await serve(data_dir=data, snapshot_every_frames=100, snapshot_interval_s=0)
    full = {"on": False}
    real_append, real_snapshot = wal.WriteAheadLog.append, backend_module.Backend.snapshot

    def append(self, record):
        if full["on"]:
            raise OSError(28, "No space left on device")
        return real_append(self, record)

    async def snapshot(self, session):
        if full["on"]:
            raise OSError(28, "No space left on device")
        await real_snapshot(self, session)

    monkeypatch.setattr(wal.WriteAheadLog, "append", append)
    monkeypatch.setattr(backend_module.Backend, "snapshot", snapshot)
    async with client.session(fps=1.0) as s:
        path = wal.wal_path(data, s.session_id)
        for i in range(2):
            assert (await s.send_frame(image(i), float(i), wait=True)).accepted
        full["on"] = True
        from vrex.client import VRexError

        with pytest.raises(VRexError) as err:
            await s.send_frame(image(2), 2.0, wait=True)
        assert err.value.code == "RESOURCE_EXHAUSTED" and "not durable" in err.value.message
        assert [r.meta["frame_index"] for r in wal.read_log(path).records] == [0, 1]
        full["on"] = False
        assert (await s.send_frame(image(3), 3.0, wait=True)).accepted
        assert wal.read_log(path).records == []  # the snapshot holds everything now
        assert _snapshot_state(data, s.session_id)["frames_accepted"] == 4
        assert (await s.send_frame(image(4), 4.0, wait=True)).accepted  # back to logging
        assert [r.meta["frame_index"] for r in wal.read_log(path).records] == [4]


def test_a_failed_append_leaves_no_partial_record(tmp_path, monkeypatch):
    path = tmp_path / "s.wal"
    first, second = wal.frame_record(b"a" * 50, 0, 0.0), wal.frame_record(b"b" * 50, 1, 1.0)
    with wal.WriteAheadLog(path) as log:
        log.append(first)
        real_flush = log._file.flush

        def flush_part():  # a disk that takes part of the record, then fills up
            real_flush()
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(log._file, "flush", flush_part)
        with pytest.raises(OSError):
            log.append(second)
        monkeypatch.setattr(log._file, "flush", real_flush)
        log.append(second)
    assert wal.read_log(path).records == [first, second]


async def test_an_answer_that_fails_midway_is_logged_with_what_it_generated(serve, tmp_path):
    """The engine closes a failed answer's turn with its tokens in the history, so the log must
    hold them too, or a replay after a crash would differ from the session that went on."""
    from vrex.client import VRexError

    data = tmp_path / "data"
    server, client = await serve(data_dir=data, snapshot_every_frames=100, snapshot_interval_s=0)
    async with client.session(fps=1.0) as s:
        path = wal.wal_path(data, s.session_id)
        assert (await s.send_frame(image(0), 0.0, wait=True)).accepted
        with pytest.raises(VRexError, match="failed mid-answer"):
            await s.ask_text("FAIL_MIDWAY please", max_new_tokens=8)
        answers = [r.meta for r in wal.read_log(path).records if r.kind == "answer"]
        assert answers == [{"answer_index": 0, "question": "FAIL_MIDWAY please", "token_ids": [1000, 1001]}]
        answer = await s.ask_text("and now?", max_new_tokens=3)  # the session goes on
        assert answer.num_tokens == 3
        assert [r.meta["answer_index"] for r in wal.read_log(path).records if r.kind == "answer"] == [0, 1]


async def test_replay_skips_what_the_snapshot_holds(serve, tmp_path):
    """A crash after a snapshot but before the log was emptied: replay must not double records."""
    data = tmp_path / "data"
    server, client = await serve(data_dir=data, snapshot_every_frames=1000, snapshot_interval_s=0)
    servicer = server.servicer
    async with client.session(fps=1.0) as s:
        sid = s.session_id
        for i in range(3):
            await s.send_frame(image(i), float(i), wait=True)
        await s.ask_text("first?", max_new_tokens=3)
        live = servicer.sessions[sid]
        await servicer.backend.snapshot(live.engine_session)  # snapshot done, log not emptied...
        snapshot = (data / sid / "state.json").read_text()
        for i in range(3, 5):
            await s.send_frame(image(i), float(i), wait=True)
        acked = (await s.stats()).history_tokens
        log_bytes = wal.wal_path(data, sid).read_bytes()
    # ... and the crash: closing has emptied the log, so put both back as they were
    (data / sid / "state.json").write_text(snapshot)
    wal.wal_path(data, sid).write_bytes(log_bytes)
    restored = servicer.backend.engine.resume(sid)
    assert restored.stats()["frames_accepted"] == 3
    report = await wal.replay(servicer.backend, restored, wal.read_log(wal.wal_path(data, sid)))
    assert (report.frames_replayed, report.answers_replayed, report.records_skipped) == (2, 0, 4)
    assert restored.stats()["history_tokens"] == acked and restored.stats()["frames_accepted"] == 5
    restored.close()


async def test_snapshot_mode_still_snapshots_before_each_ack(serve, tmp_path):
    data = tmp_path / "data"
    server, client = await serve(data_dir=data, durability="snapshot")
    async with client.session(fps=1.0) as s:
        for i in range(2):
            await s.send_frame(image(i), float(i), wait=True)
            assert _snapshot_state(data, s.session_id)["frames_accepted"] == i + 1
        assert not wal.wal_path(data, s.session_id).exists()


# ---------------------------------------------------------------------------- kill -9, real process


async def _stream_then_crash(server, num_before: int, num_after: int, ask: bool = True):
    async with Client(server.target) as client:
        s = client.session(fps=1.0)
        await s.start()
        acks = [await s.send_frame(image(i), float(i), wait=True) for i in range(num_before)]
        answer = await s.ask_text("what happened so far?", max_new_tokens=6) if ask else None
        acks += [
            await s.send_frame(image(i), float(i), wait=True)
            for i in range(num_before, num_before + num_after)
        ]
        assert all(a.accepted for a in acks)
        server.kill9()  # right after the last ack: nothing flushed on the way out
        s.cancel()
    return s.session_id, acks, answer


async def test_kill9_right_after_acks_replays_the_log(start_server, engine_kind, tmp_path):
    data = tmp_path / "data"
    flags = ("--data-dir", str(data), "--snapshot-every", "1000")
    server = start_server(*flags, kind=engine_kind)
    sid, acks, answer = await _stream_then_crash(server, 3, 2)
    assert answer.num_tokens > 0
    log = wal.read_log(wal.wal_path(data, sid))
    assert [r.kind for r in log.records] == ["frame"] * 3 + ["answer"] + ["frame"] * 2

    server2 = start_server(*flags, kind=engine_kind)
    async with Client(server2.target) as client:
        info = await client.resume_session(sid)
        assert info.resumed and info.frames_accepted == 5
        assert info.history_tokens == acks[-1].history_tokens  # the answer is in the history too
        async with client.session(resume_session_id=sid) as again:
            ack = await again.send_frame(image(9), 10.0, wait=True)
            assert ack.accepted and ack.frame_index == acks[-1].frame_index + 1
            if engine_kind == "fake":
                assert "6 frames" in (await again.ask_text("and now?")).text
    assert '"event": "wal_replayed"' in server2.log() and '"frames": 5' in server2.log()


async def test_torn_record_after_kill9_is_ignored(start_server, tmp_path):
    data = tmp_path / "data"
    flags = ("--data-dir", str(data))
    server = start_server(*flags)
    sid, acks, _ = await _stream_then_crash(server, 4, 0, ask=False)
    path = wal.wal_path(data, sid)
    torn = wal.frame_record(_frame_bytes(99, 50.0), 4, 50.0).encode()
    with open(path, "ab") as f:  # a fifth frame half-written when the power went
        f.write(torn[: len(torn) // 2])
    server2 = start_server(*flags)
    async with Client(server2.target) as client:
        info = await client.resume_session(sid)
        assert info.frames_accepted == 4 and info.history_tokens == acks[-1].history_tokens
        async with client.session(resume_session_id=sid) as again:
            assert (await again.send_frame(image(5), 5.0, wait=True)).frame_index == 4
    assert f'"torn_bytes": {len(torn) // 2}' in server2.log()
    assert len(wal.read_log(path).records) == 0  # closed: snapshotted and emptied


# ---------------------------------------------------------------------------- real engine


@pytest.mark.slow
async def test_real_engine_replay_reproduces_the_history(tmp_path):
    """Snapshot + replayed log == the session that never crashed: same history, same next answer."""
    pytest.importorskip("vrex.engine.engine")
    import vrex.engine as engine_module
    from server.backend import Backend
    from vrex.engine import Engine, EngineConfig, SessionSettings

    engine = Engine(EngineConfig(data_dir=str(tmp_path / "data")))
    backend = Backend(module=engine_module, engine=engine)
    live = engine.open_session(SessionSettings(fps=1.0, max_new_tokens=4))
    base = live.snapshot()
    with wal.WriteAheadLog(tmp_path / "s.wal") as log:

        def frame(seed: int, ts: float) -> None:
            raw = image(seed, 32, 32)
            msg = pb.Frame(raw=pb.RawImage(rgb=raw.tobytes(), width=32, height=32), timestamp_s=ts)
            result = live.add_frame(raw, ts)
            assert result.accepted
            log.append(wal.frame_record(msg.SerializeToString(), result.frame_index, ts))

        frame(0, 0.0)
        assert not live.add_frame(image(1, 32, 32), 0.5).accepted  # dropped: never logged
        frame(2, 1.0)
        list(live.generate("What do you see?", max_new_tokens=4))
        ids, index = backend.answer_history(live)
        assert index == 0 and len(ids) >= 1
        log.append(wal.answer_record("What do you see?", ids, index))
        frame(3, 2.0)
    restored = type(live).restore(engine, base)
    report = await wal.replay(backend, restored, wal.read_log(tmp_path / "s.wal"))
    assert (report.frames_replayed, report.answers_replayed, report.records_skipped) == (3, 1, 0)
    assert restored.history_tokens == live.history_tokens
    assert restored.frame_index == live.frame_index and restored.counters["answers"] == 1
    original = [d.token_id for d in live.generate("And now?", max_new_tokens=6)]
    again = [d.token_id for d in restored.generate("And now?", max_new_tokens=6)]
    assert again == original
    restored.close()
    engine.shutdown()


@pytest.mark.slow
def test_wal_cost_benchmark_runs(tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "benchmarks.server_wal", "--frames", "2", "--at", "1,2", "--json"]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    first, second = report["points"]
    assert second["history_tokens"] > first["history_tokens"] > 0
    assert second["snapshot_bytes"] > first["snapshot_bytes"] > 0
    assert 0 < first["wal_append_ms_median"] and 0 < first["wal_record_bytes"] < 100_000
    assert report["replay_history_matches"] is True
