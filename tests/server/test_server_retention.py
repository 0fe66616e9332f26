"""What a server keeps in --data-dir: one server per data dir, crash leftovers cleaned at start,
closed sessions' snapshots and logs deleted after --keep-closed (and only theirs)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import vrex.engine as engine_module
from server import retention, wal
from server.backend import Backend
from server.config import ServerConfig
from server.service import create_server
from vrex.client import Client, VRexError


def test_keep_closed_durations():
    assert retention.parse_keep("7d") == 7 * 86400
    assert retention.parse_keep("12h") == 12 * 3600
    assert retention.parse_keep("30m") == 1800
    assert retention.parse_keep("90") == retention.parse_keep("90s") == 90
    assert retention.parse_keep("forever") is None
    for bad in ("-1d", "7 days", "", "1w"):
        with pytest.raises(ValueError, match="--keep-closed"):
            retention.parse_keep(bad)
    with pytest.raises(ValueError, match="keep_closed_s"):
        ServerConfig(keep_closed_s=-1)


def test_one_server_per_data_dir(tmp_path):
    first = retention.DataDirLock(tmp_path / "data")
    with pytest.raises(
        ValueError, match=rf"--data-dir .* is in use by another vrex serve \(pid {os.getpid()}\)"
    ):
        retention.DataDirLock(tmp_path / "data")
    first.release()
    retention.DataDirLock(tmp_path / "data").release()  # free again once released


def test_clean_scratch_removes_only_what_no_session_owns(tmp_path):
    data = tmp_path / "data"
    sessions = data / "sessions"
    tier = data / "kv-disk" / "abc" / "vrex-kv-x"
    tier.mkdir(parents=True)
    (tier / "layer000.kv").write_bytes(b"\0" * 4096)
    for folder in ("abc", ".abc.tmp-1", ".abc.old-2", ".gone.old-3", ".def.pruned-4"):
        (sessions / folder).mkdir(parents=True)
        (sessions / folder / "session.json").write_text("{}")
    (data / "wal").mkdir()
    (data / "wal" / "abc.wal").write_bytes(b"log")
    (data / "wal" / ".def.wal.pruned-4").write_bytes(b"log")
    report = retention.clean_scratch(data)
    assert report["paths"] == 5 and report["bytes"] >= 4096
    left = sorted(p.name for p in sessions.iterdir())
    # the snapshot, and the set-aside copy that is the only one of its session
    assert left == [".gone.old-3", "abc"]
    assert [p.name for p in (data / "wal").iterdir()] == ["abc.wal"]
    assert list((data / "kv-disk").iterdir()) == []


def test_expired_counts_from_the_last_snapshot_or_log_write_and_finds_orphan_copies(tmp_path):
    data = tmp_path / "data"
    sessions, wal_dir = data / "sessions", data / "wal"
    wal_dir.mkdir(parents=True)
    for folder in ("old", "logged", "busy", ".orphan.old-1"):
        (sessions / folder).mkdir(parents=True)
        (sessions / folder / "session.json").write_text("{}")
    (wal_dir / "logged.wal").write_bytes(b"log")  # written after its snapshot
    now = time.time()
    for path in [*sessions.rglob("*"), *sessions.iterdir()]:
        os.utime(path, (now - 7200, now - 7200))
    assert retention.expired(data, 3600, busy={"busy"}, now_s=now) == ["old", "orphan"]
    moved = retention.set_aside(data, "orphan")
    assert [p.name.split(retention.PRUNED)[0] for p in moved] == [".orphan.old-1"]
    assert retention.expired(data, 3600, busy={"busy"}, now_s=now) == ["old"]
    assert retention.delete(moved) > 0 and not any(p.exists() for p in moved)


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)


async def test_closed_sessions_are_pruned_after_keep_closed_and_live_ones_stay(tiny_smolvlm_dir, tmp_path):
    data = tmp_path / "data"
    config = ServerConfig(port=0, model_dir=tiny_smolvlm_dir, data_dir=data, keep_closed_s=3600)
    # a device tier that overflows at once, straight to disk: each session makes a disk tier
    engine_config = engine_module.EngineConfig(
        model_dir=str(tiny_smolvlm_dir),
        data_dir=str(data),
        device_kv_budget_bytes=30_000,
        host_kv_budget_bytes=0,
    )
    engine = engine_module.Engine(engine_config)
    server = await create_server(config, Backend(module=engine_module, engine=engine))
    await server.start()
    client = Client(f"127.0.0.1:{server.port}")
    try:
        ids = []
        for seed in range(2):
            async with client.session(fps=1.0) as s:
                for ts in range(4):
                    assert (
                        await s.send_frame(image(seed + ts), float(ts), wait=True, encoding="png")
                    ).accepted
                assert any((data / "kv-disk" / s.session_id).iterdir())
                ids.append(s.session_id)
        old, recent = ids
        two_hours_ago = time.time() - 7200
        for path in (
            data / "sessions" / old / "session.json",
            data / "sessions" / old,
            wal.wal_path(data, old),
        ):
            os.utime(path, (two_hours_ago, two_hours_ago))
        async with client.session(fps=1.0) as live:
            live_id = live.session_id
            for path in (data / "sessions" / live_id / "session.json", wal.wal_path(data, live_id)):
                os.utime(path, (two_hours_ago, two_hours_ago))
            os.utime(data / "sessions" / live_id, (two_hours_ago, two_hours_ago))
            await server.servicer.prune_closed()
            # a live session is never pruned, however old its snapshot
            assert (data / "sessions" / live_id / "session.json").exists()
            assert wal.wal_path(data, live_id).exists()
            assert (await live.send_frame(image(5), 0.0, wait=True, encoding="png")).accepted
        saved = engine.list_snapshots()
        assert old not in saved and {recent, live_id} <= set(saved)
        assert not wal.wal_path(data, old).exists()
        assert not any(p.name.startswith(".") for p in (data / "sessions").iterdir())
        assert list((data / "kv-disk").iterdir()) == []  # closed sessions leave no folder behind
        with pytest.raises(
            VRexError, match=r"NOT_FOUND.* deleted 1 h after their last snapshot: --keep-closed"
        ):
            async with client.session(resume_session_id=old):
                pass
        async with client.session(resume_session_id=recent) as back:
            assert back.opened.frames_accepted == 4
    finally:
        await client.close()
        await server.stop(0)


async def test_serve_refuses_a_data_dir_another_server_holds(tmp_path):
    from server.service import serve

    held = retention.DataDirLock(tmp_path / "data")
    try:  # refused before the engine loads: no model is needed to see it
        with pytest.raises(ValueError, match="in use by another vrex serve"):
            await serve(ServerConfig(port=0, data_dir=tmp_path / "data"))
    finally:
        held.release()
