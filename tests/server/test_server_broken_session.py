"""A session whose store failed half-way (vrex.engine.SessionBrokenError), seen from a client of
an in-process server over the real engine (tiny model): every later request gets
FAILED_PRECONDITION saying how to go on, the last good snapshot and the log are kept, and
resuming goes back to them with every acknowledged frame. Also: a device budget no session could
open with stops `create_backend`, naming the flag."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import vrex.engine as engine_module
from server import wal
from server.backend import Backend, create_backend
from server.config import ServerConfig
from server.service import create_server
from vrex.client import Client, VRexError


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)


async def test_broken_session_refuses_requests_and_resumes_from_its_snapshot_and_log(
    tiny_smolvlm_dir, tmp_path
):
    data = tmp_path / "data"
    config = ServerConfig(port=0, model_dir=tiny_smolvlm_dir, data_dir=data)
    engine = engine_module.Engine(
        engine_module.EngineConfig(model_dir=str(tiny_smolvlm_dir), data_dir=str(data))
    )
    server = await create_server(config, Backend(module=engine_module, engine=engine))
    await server.start()
    client = Client(f"127.0.0.1:{server.port}")
    try:
        async with client.session(fps=1.0) as s:
            assert (await s.send_frame(image(0), 0.0, wait=True, encoding="png")).accepted
            store = engine.sessions[s.session_id].store
            append = store.append

            def append_or_fail(layer, *args):
                if layer == 1:
                    raise OSError(28, "No space left on device")
                return append(layer, *args)

            store.append = append_or_fail
            for ts in (1.0, 2.0):
                with pytest.raises(VRexError) as refused:
                    await s.send_frame(image(1), ts, wait=True, encoding="png")
                assert refused.value.code == "FAILED_PRECONDITION"
                assert "lost a step half-way" in str(refused.value) and "resume" in str(refused.value)
            with pytest.raises(VRexError, match="FAILED_PRECONDITION"):
                await s.ask_text("what now?", max_new_tokens=2)
            sid = s.session_id
        assert s.closed_event is not None and s.closed_event.resumable
        # not snapshotted while broken: the base snapshot and the acked frame's record remain
        state = json.loads((data / "sessions" / sid / "session.json").read_text())
        assert state["frame_index"] == 0 and state["next_position"] == state["prefix_tokens"]
        assert [r.kind for r in wal.read_log(wal.wal_path(data, sid)).records] == ["frame"]
        async with client.session(resume_session_id=sid) as back:
            ack = await back.send_frame(image(1), 1.0, wait=True, encoding="png")
            assert ack.accepted and ack.frames_accepted == 2
            restored = engine.sessions[sid]
            lengths = {restored.store.length(layer) for layer in range(restored.store.num_layers)}
            assert lengths == {restored.history_tokens}
    finally:
        await client.close()
        await server.stop(0)


def test_create_backend_refuses_a_device_budget_below_the_prompt_prefix(tiny_smolvlm_dir, monkeypatch):
    monkeypatch.delenv("VREX_TEST_FAKE_ENGINE", raising=False)
    config = ServerConfig(port=0, model_dir=tiny_smolvlm_dir, device_kv_budget_bytes=20_000)
    with pytest.raises(ValueError, match=r"--device-kv-budget 20000 bytes is too small.*prompt prefix"):
        create_backend(config)
    backend = create_backend(dataclasses.replace(config, device_kv_budget_bytes=200_000))
    backend.engine.shutdown()
