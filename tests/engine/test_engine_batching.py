"""Cross-session batched prefill: one forward for several sessions' frames equals running them
one by one, and the batch really happens."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from vrex.engine import Engine, EngineConfig, SessionSettings
from vrex.engine.batching import forward_batch
from vrex.models import load_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def smolvlm_adapter(tiny_smolvlm_dir):
    return load_model(tiny_smolvlm_dir)


def _frames(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(n)]


POLICIES = ("resv", "full", "window")


def _open_three(engine):
    """Three sessions with different policies and different histories (1, 3 and 5 frames)."""
    sessions = []
    for i, policy in enumerate(POLICIES):
        s = engine.open_session(SessionSettings(policy=policy, fps=1), session_id=f"s{i}")
        for j, frame in enumerate(_frames(1 + 2 * i, seed=10 + i)):
            assert s.add_frame(frame, float(j)).accepted
        sessions.append(s)
    return sessions


def _history(session):
    store = session.store
    return [
        store.fetch(layer, [torch.arange(store.length(layer))] * store.num_kv_heads)
        for layer in range(store.num_layers)
    ]


def _question_logits(session):
    logits, _, _ = session._step(session.adapter.question_input("what happened?"), "text", last_only=False)
    return logits


@pytest.mark.parametrize("batch", [True, False])
def test_batched_prefill_equals_sequential(smolvlm_adapter, batch, submit_together):
    adapter = smolvlm_adapter
    seq_engine = Engine(EngineConfig(model_dir=str(adapter.path)), adapter=adapter)
    bat_engine = Engine(EngineConfig(model_dir=str(adapter.path), batch_frames=batch), adapter=adapter)
    seq = _open_three(seq_engine)
    bat = _open_three(bat_engine)
    for step in range(2):
        frames = _frames(3, seed=100 + step)
        t = 10.0 + step
        expected = [s.add_frame(f, t) for s, f in zip(seq, frames, strict=True)]
        got = submit_together(bat, frames, t)
        for e, g in zip(expected, got, strict=True):
            assert g.accepted and e.accepted
            assert (g.frame_index, g.history_tokens) == (e.frame_index, e.history_tokens)
            assert g.fetched_fraction == pytest.approx(e.fetched_fraction, abs=1e-9)
    stats = bat_engine.stats()
    if batch:
        assert stats["batched_forwards"] == 2 and stats["batched_rows"] == 6 and stats["max_batch_rows"] == 3
        assert all(s.steps[-1]["batch_rows"] == 3 for s in bat)
    else:
        assert stats["batched_forwards"] == 0 and stats["forwards"] == 6
    for s_seq, s_bat in zip(seq, bat, strict=True):
        assert s_seq.cache.next_position == s_bat.cache.next_position
        assert s_seq.cache.get_seq_length() == s_bat.cache.get_seq_length()
        for a, b in zip(_history(s_seq), _history(s_bat), strict=True):
            assert torch.equal(a.lengths, b.lengths)
            assert torch.allclose(a.keys, b.keys, atol=1e-5, rtol=0)
            assert torch.allclose(a.values, b.values, atol=1e-5, rtol=0)
        ref, out = _question_logits(s_seq), _question_logits(s_bat)
        assert float((ref - out).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
        assert s_seq.stats()["frames_accepted"] == s_bat.stats()["frames_accepted"]


def test_forward_batch_rows_equal_single_forwards(smolvlm_adapter):
    """The batched decoder call itself: row b's logits are session b's single-row logits."""
    adapter = smolvlm_adapter
    engine = Engine(EngineConfig(model_dir=str(adapter.path)), adapter=adapter)
    one = _open_three(engine)
    two = _open_three(engine)
    steps = [adapter.frame_embeds(f) for f in _frames(3, seed=7)]
    singles = []
    for s, step in zip(one, steps, strict=True):
        s.policy.begin_step("frame", step.num_tokens)
        singles.append(adapter.forward(step, s.cache, last_logits_only=False))
        s.policy.end_step()
    for s, step in zip(two, steps, strict=True):
        s.policy.begin_step("frame", step.num_tokens)
    batched = forward_batch(adapter, steps, [s.cache for s in two], last_logits_only=False)
    assert batched.shape[0] == 3
    for b, ref in enumerate(singles):
        assert torch.allclose(batched[b : b + 1], ref, atol=1e-5, rtol=1e-5)


def test_forward_batch_refuses_unequal_rows(smolvlm_adapter):
    adapter = smolvlm_adapter
    engine = Engine(EngineConfig(model_dir=str(adapter.path)), adapter=adapter)
    a, b = (engine.open_session(SessionSettings(policy="full")) for _ in range(2))
    with pytest.raises(ValueError, match="same token count"):
        forward_batch(
            adapter,
            [adapter.text_embeds("hello"), adapter.text_embeds("a longer text here")],
            [a.cache, b.cache],
        )
    with pytest.raises(ValueError, match="one cache per step"):
        forward_batch(adapter, [adapter.text_embeds("hello")], [a.cache, b.cache])


def test_bad_frame_fails_only_its_own_request(smolvlm_adapter):
    adapter = smolvlm_adapter
    engine = Engine(EngineConfig(model_dir=str(adapter.path)), adapter=adapter)
    good, bad = (engine.open_session(SessionSettings(policy="resv", fps=1)) for _ in range(2))

    async def go():
        return await asyncio.gather(
            good.submit_frame(_frames(1, 3)[0], 0.0),
            bad.submit_frame(np.zeros((4, 4), np.uint8), 0.0),
            return_exceptions=True,
        )

    ok, err = asyncio.run(go())
    assert ok.accepted and isinstance(err, ValueError)
    assert good.history_tokens > bad.history_tokens
    # both sessions keep working
    again = asyncio.run(bad.submit_frame(_frames(1, 4)[0], 1.0))
    assert again.accepted


def test_engine_config_rejects_bad_batch_rows():
    with pytest.raises(ValueError, match="max_batch_rows"):
        EngineConfig(max_batch_rows=0)


def test_pending_frames_are_bounded(smolvlm_adapter):
    """At most 2 x max_sessions frames wait for the model thread; a session sheds the frames
    that arrive while its previous one is still in flight."""
    adapter = smolvlm_adapter
    engine = Engine(EngineConfig(model_dir=str(adapter.path), max_sessions=1), adapter=adapter)
    s = engine.open_session(SessionSettings(policy="resv", fps=100))
    frame = _frames(1, 5)[0]
    gate = threading.Event()

    async def go():
        held = asyncio.ensure_future(engine.run(gate.wait))
        direct = [asyncio.ensure_future(engine.submit_frame(s, frame, float(i))) for i in range(3)]
        await asyncio.sleep(0.01)
        gate.set()
        await held
        return await asyncio.gather(*direct, return_exceptions=True)

    results = asyncio.run(go())
    assert [r.accepted for r in results[:2]] == [True, True]
    assert isinstance(results[2], RuntimeError) and "waiting" in str(results[2])
    # two frames of one session never share a forward: the second extends the first
    assert s.history_tokens == s.prefix_tokens + 2 * engine.frame_tokens
    assert engine.stats()["batched_forwards"] == 0

    async def twice():
        return await asyncio.gather(s.submit_frame(frame, 5.0), s.submit_frame(frame, 6.0))

    first, second = asyncio.run(twice())
    assert first.accepted and not second.accepted
    assert "behind real time" in second.dropped_reason
