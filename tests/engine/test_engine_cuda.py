"""The engine on a CUDA device: the same answers as on CPU, tiers and snapshots included.

float32 on both sides where answers are compared (`dtype="auto"` would pick bfloat16 on a GPU).

Skipped where torch sees no CUDA device; `benchmarks/gpu.sh` runs them on a lent GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vrex.resv as resv
from vrex.engine import Engine, EngineConfig, SessionSettings
from vrex.models import load_model, tiny_random
from vrex.models.tiny import FAMILIES

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _frames(n, seed=0, h=48, w=64):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def _session_logits(folder, device, settings, frames, tmp_path, **budgets):
    engine = Engine(
        EngineConfig(
            model_dir=str(folder), device=device, dtype="float32", data_dir=str(tmp_path / device), **budgets
        ),
        adapter=load_model(folder, device=device),
    )
    s = engine.open_session(settings)
    if engine.accepts_frames:
        for i, f in enumerate(frames):
            assert s.add_frame(f, float(i)).accepted
    else:  # text-only families: a text history stands in for the frames
        ids = engine.adapter.tokenize("a long text history " * 20)
        for i in range(0, len(ids), 16):
            s._step(engine.adapter._ids_step(ids[i : i + 16], "frame"), "frame")
    logits, _, _ = s._step(engine.adapter.question_input("what is in the video?"), "text", last_only=False)
    return s, logits.float().cpu()


@pytest.mark.parametrize("family", FAMILIES)
def test_full_policy_on_cuda_matches_cpu_with_history_on_host_and_disk(family, tmp_path):
    folder = tiny_random(family, folder=tmp_path / family)
    budgets = dict(device_kv_budget_bytes=20_000, host_kv_budget_bytes=20_000)
    frames = _frames(4)
    settings = SessionSettings(policy="full", fps=1)
    _, cpu = _session_logits(folder, "cpu", settings, frames, tmp_path, **budgets)
    s, gpu = _session_logits(folder, "cuda", settings, frames, tmp_path, **budgets)
    rel = (gpu - cpu).abs().max() / cpu.abs().max()
    assert float(rel) <= 1e-3  # float32 on both; TF32 matmuls may differ in the last bits
    if s.engine.accepts_frames:
        assert s.stats()["kv_resident_tokens_disk"] > 0


def test_resv_on_cuda_selects_what_cpu_selects(tmp_path):
    folder = tiny_random("smolvlm", folder=tmp_path / "m")
    frames = _frames(8, seed=3)
    settings = SessionSettings(policy="resv", fps=1, resv_config=resv.DEFAULT)
    s_cpu, cpu = _session_logits(folder, "cpu", settings, frames, tmp_path, device_kv_budget_bytes=200_000)
    s_gpu, gpu = _session_logits(folder, "cuda", settings, frames, tmp_path, device_kv_budget_bytes=200_000)
    a, b = s_cpu.stats(), s_gpu.stats()
    assert b["fetched_fraction_frame"] == pytest.approx(a["fetched_fraction_frame"], abs=0.02)
    assert 0 < b["fetched_fraction_frame"] < 1
    rel = (gpu - cpu).abs().max() / cpu.abs().max()
    assert float(rel) <= 5e-2  # a borderline cluster may flip between devices; the answer must not drift


def test_device_budget_holds_in_gpu_memory_and_tiers_return_bit_exact(tmp_path):
    folder = tiny_random("smolvlm", folder=tmp_path / "m")
    budget = 150_000
    engine = Engine(
        EngineConfig(
            model_dir=str(folder),
            device="cuda",
            dtype="float32",
            device_kv_budget_bytes=budget,
            host_kv_budget_bytes=150_000,
            block_tokens=4,
            data_dir=str(tmp_path / "data"),
        )
    )
    s = engine.open_session(SessionSettings(policy="resv", fps=1))
    peak = 0
    for i, f in enumerate(_frames(40, seed=2, h=32, w=32)):
        s.add_frame(f, float(i))
        peak = max(peak, s.store.stats()["resident_bytes_device"])
    assert 0 < peak <= budget
    assert s.stats()["kv_resident_tokens_disk"] > 0
    for layer in (0, engine.adapter.num_layers - 1):
        k_all, v_all = s.store.fetch_all(layer)
        assert k_all.device.type == "cuda"
        n = s.store.length(layer)
        got = s.store.fetch(layer, [torch.arange(n)] * engine.adapter.num_kv_heads)
        assert torch.equal(got.keys, k_all) and torch.equal(got.values, v_all)


def test_snapshot_taken_on_cuda_resumes_on_cpu(tmp_path):
    folder = tiny_random("smolvlm", folder=tmp_path / "m")
    data = str(tmp_path / "data")
    frames = _frames(5, seed=4)
    gpu_engine = Engine(EngineConfig(model_dir=str(folder), device="cuda", dtype="float32", data_dir=data))
    s = gpu_engine.open_session(SessionSettings(policy="full", fps=1))
    for i, f in enumerate(frames[:4]):
        s.add_frame(f, float(i))
    s.snapshot()
    gpu_engine.close_session(s.id)
    cpu_engine = Engine(EngineConfig(model_dir=str(folder), device="cpu", data_dir=data))
    restored = cpu_engine.resume(s.id)
    restored.add_frame(frames[4], 4.0)
    q = cpu_engine.adapter.question_input("what?")
    got, _, _ = restored._step(q, "text", last_only=False)
    ref_s = cpu_engine.open_session(SessionSettings(policy="full", fps=1))
    for i, f in enumerate(frames):
        ref_s.add_frame(f, float(i))
    ref, _, _ = ref_s._step(q, "text", last_only=False)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-3


def test_generate_streams_tokens_on_cuda(tmp_path):
    folder = tiny_random("smolvlm", folder=tmp_path / "m")
    engine = Engine(EngineConfig(model_dir=str(folder), device="cuda", dtype="bfloat16"))
    s = engine.open_session(SessionSettings(policy="resv", fps=1, max_new_tokens=4))
    for i, f in enumerate(_frames(3)):
        s.add_frame(f, float(i))
    list(s.generate("what?"))  # a random tiny model may stop at once; the question step still runs
    st = s.stats()
    assert st["answers"] == 1 and st["fetched_fraction_text"] > 0
    assert st["device_memory_allocated_bytes"] > 0
