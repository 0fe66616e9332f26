"""A step happens whole or not at all: a step the device budget may not hold is refused before
it changes anything, a forward that fails half-way leaves the session as it was, and a store
that fails half-way leaves a session that says so (and a snapshot to resume) instead of one
that answers from a history some layers hold and others do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vrex.engine import Engine, EngineConfig, PartialStepError, SessionBrokenError, SessionSettings
from vrex.models import load_model

torch.set_num_threads(1)

# smolvlm tiny: 3 layers, 2 KV heads, head_dim 16, fp32 -> 512-byte blocks of 4 tokens; its
# prompt prefix is 44 tokens (45,056 bytes for ReSV at one block per token and KV head)
BLOCK_TOKENS = 4
BUDGET = 60_000
LONG_QUESTION = "describe the scene in great detail please " * 4


@pytest.fixture(scope="module")
def adapter(tiny_smolvlm_dir):
    return load_model(tiny_smolvlm_dir)


def _engine(adapter, **overrides) -> Engine:
    config = dict(model_dir=str(adapter.path), device_kv_budget_bytes=BUDGET, block_tokens=BLOCK_TOKENS)
    return Engine(EngineConfig(**{**config, **overrides}), adapter=adapter)


def _frames(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(n)]


def _question_logits(session, question="what happened?"):
    logits, _, _ = session._step(session.adapter.question_input(question), "text", last_only=False)
    return logits


def _lengths(session):
    return [session.store.length(layer) for layer in range(session.store.num_layers)]


def test_question_over_the_device_budget_is_refused_and_the_session_goes_on(adapter):
    engine = _engine(adapter)
    frames = _frames(3)
    s = engine.open_session(SessionSettings(policy="resv", fps=1))
    ref = engine.open_session(SessionSettings(policy="resv", fps=1))
    for i, f in enumerate(frames[:2]):
        assert s.add_frame(f, float(i)).accepted and ref.add_frame(f, float(i)).accepted
    before = _lengths(s)
    with pytest.raises(
        ValueError, match=r"this question \(\d+ tokens\).*--device-kv-budget.*shorter question"
    ):
        list(s.generate(LONG_QUESTION, max_new_tokens=2))
    assert _lengths(s) == before
    # the refusal left nothing behind: the session continues exactly like one never asked
    assert s.add_frame(frames[2], 2.0).accepted and ref.add_frame(frames[2], 2.0).accepted
    assert torch.equal(_question_logits(s), _question_logits(ref))


def test_full_policy_takes_a_step_resv_may_not_hold(adapter):
    """Step paging fills ceil(T / block) blocks per KV head, ReSV up to one per token."""
    engine = _engine(adapter)
    s = engine.open_session(SessionSettings(policy="full", fps=1))
    list(s.generate(LONG_QUESTION, max_new_tokens=1))
    assert s.store.stats()["resident_bytes_device"] <= BUDGET


def test_forward_failing_half_way_changes_nothing(adapter):
    engine = _engine(adapter, device_kv_budget_bytes=None)
    frames = _frames(3, seed=1)
    s = engine.open_session(SessionSettings(policy="resv", fps=1))
    ref = engine.open_session(SessionSettings(policy="resv", fps=1))
    assert s.add_frame(frames[0], 0.0).accepted and ref.add_frame(frames[0], 0.0).accepted
    attend = s.policy.attend

    def fail_at_layer_two(layer, *args):
        if layer == 2:
            raise RuntimeError("injected failure in layer 2")
        return attend(layer, *args)

    s.policy.attend = fail_at_layer_two
    before = (_lengths(s), s.cache.next_position, s.cache.get_seq_length())
    with pytest.raises(RuntimeError, match="injected"):
        s.add_frame(frames[1], 1.0)
    assert (_lengths(s), s.cache.next_position, s.cache.get_seq_length()) == before
    s.policy.attend = attend
    for i, f in enumerate(frames[1:], start=1):
        assert s.add_frame(f, float(i)).accepted and ref.add_frame(f, float(i)).accepted
    assert torch.equal(_question_logits(s), _question_logits(ref))


def _fail_store_at_layer_one(session):
    append = session.store.append

    def append_or_fail(layer, *args):
        if layer == 1:
            raise OSError(28, "No space left on device")
        return append(layer, *args)

    session.store.append = append_or_fail


def test_store_failing_half_way_breaks_the_session_and_its_snapshot_resumes(adapter, tmp_path):
    engine = _engine(adapter, data_dir=str(tmp_path))
    frames = _frames(3, seed=2)
    s = engine.open_session(SessionSettings(policy="resv", fps=1))
    assert s.add_frame(frames[0], 0.0).accepted
    s.snapshot()
    _fail_store_at_layer_one(s)
    with pytest.raises(SessionBrokenError, match="layer 1 after 1 of 3 layers") as failed:
        s.add_frame(frames[1], 1.0)
    assert isinstance(failed.value.__cause__, PartialStepError)
    assert s.broken and "No space left" in s.broken
    for attempt in (lambda: s.add_frame(frames[2], 2.0), lambda: list(s.generate("hi")), s.snapshot):
        with pytest.raises(SessionBrokenError, match="lost a step half-way"):
            attempt()
    engine.close_session(s.id)
    back = engine.resume(s.id)  # the snapshot taken before the failure, untouched
    assert len(set(_lengths(back))) == 1
    assert back.add_frame(frames[1], 1.0).accepted


def test_a_refused_or_broken_session_fails_only_its_own_row_of_a_batch(adapter, submit_together):
    engine = _engine(adapter, device_kv_budget_bytes=None)
    sessions = [
        engine.open_session(SessionSettings(policy="resv", fps=1), session_id=f"b{i}") for i in range(3)
    ]
    ref = engine.open_session(SessionSettings(policy="resv", fps=1), session_id="ref")
    warm = _frames(1, seed=3)[0]
    for s in (*sessions, ref):
        assert s.add_frame(warm, 0.0).accepted
    _fail_store_at_layer_one(sessions[0])
    frames = _frames(3, seed=4)

    results = submit_together(sessions, frames, 1.0, return_exceptions=True)
    assert isinstance(results[0], SessionBrokenError) and "No space left" in str(results[0])
    assert all(r.accepted for r in results[1:])
    assert engine.stats()["batched_forwards"] == 1
    # the broken session is refused before the next batch's forward; the others go on
    results = submit_together(sessions, frames, 2.0, return_exceptions=True)
    assert isinstance(results[0], SessionBrokenError) and all(r.accepted for r in results[1:])
    assert ref.add_frame(frames[1], 1.0).accepted and ref.add_frame(frames[1], 2.0).accepted
    assert _lengths(sessions[1]) == _lengths(ref)


def test_engine_refuses_at_start_a_budget_no_session_could_open_with(adapter):
    with pytest.raises(
        ValueError, match=r"--device-kv-budget 45000 bytes.*prompt prefix \(44 tokens\).*45056"
    ):
        _engine(adapter, device_kv_budget_bytes=45_000).check_device_budget()
    _engine(adapter).check_device_budget()
    # step paging needs ceil(44 / 4) = 11 blocks per KV head for the same prefix
    _engine(adapter, device_kv_budget_bytes=45_000).check_device_budget(SessionSettings(policy="full"))
    engine = _engine(adapter, device_kv_budget_bytes=45_000)
    with pytest.raises(ValueError, match=r"the prompt prefix \(44 tokens\).*--device-kv-budget"):
        engine.open_session()


@pytest.mark.parametrize("policy", ["full", "resv"])
def test_a_full_disk_fails_the_step_cleanly_and_the_stream_goes_on(adapter, tmp_path, disk_full, policy):
    """Evictions run before any layer takes the step (RetrievalPolicy.end_step), so a disk tier
    that cannot grow fails that frame alone; resent once space is back, the session is the one
    that never failed (exactly, for full attention)."""
    full = disk_full
    engine = _engine(adapter, host_kv_budget_bytes=0, data_dir=str(tmp_path))
    reference = _engine(adapter, device_kv_budget_bytes=None)
    s = engine.open_session(SessionSettings(policy=policy, fps=1))
    ref = reference.open_session(SessionSettings(policy=policy, fps=1))
    failed = 0
    for i, frame in enumerate(_frames(12, seed=5)):
        full["on"] = 3 <= i < 8
        try:
            s.add_frame(frame, float(i))
        except OSError as exc:
            assert "disk KV tier" in str(exc)
            failed += 1
            full["on"] = False
            assert s.add_frame(frame, float(i)).accepted  # sent again with room: taken whole
        assert ref.add_frame(frame, float(i)).accepted
        assert s.broken is None and len(set(_lengths(s))) == 1
    assert failed > 0 and s.store.stats()["resident_tokens_disk"] > 0
    assert _lengths(s) == _lengths(ref)
    if policy == "full":
        assert torch.allclose(_question_logits(s), _question_logits(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["full", "resv"])
def test_a_restored_session_takes_the_budgets_of_the_engine_it_comes_back_to(adapter, tmp_path, policy):
    """Saved under a 200 KB device tier with a host tier; resumed by an engine with 60 KB and no
    host tier: its history moves to the new tiers, whole, and the stream goes on."""
    saver = _engine(
        adapter, device_kv_budget_bytes=200_000, host_kv_budget_bytes=1 << 30, data_dir=str(tmp_path)
    )
    s = saver.open_session(SessionSettings(policy=policy, fps=1))
    frames = _frames(8, seed=6)
    for i, f in enumerate(frames[:6]):
        assert s.add_frame(f, float(i)).accepted
    s.snapshot()
    history = [s.store.fetch_all(layer) for layer in range(s.store.num_layers)]
    clusters = [s.store.position_clusters(layer) for layer in range(s.store.num_layers)]
    resumer = _engine(adapter, host_kv_budget_bytes=0, data_dir=str(tmp_path))
    back = resumer.resume(s.id)
    assert back.store.budgets.device_bytes == BUDGET and back.store.budgets.host_bytes == 0
    stats = back.store.stats()
    assert stats["resident_bytes_device"] <= BUDGET and stats["resident_tokens_disk"] > 0
    for layer, (keys, values) in enumerate(history):
        got = back.store.fetch_all(layer)
        assert torch.equal(got[0], keys) and torch.equal(got[1], values)
        assert torch.equal(back.store.position_clusters(layer), clusters[layer])
        # moved in the order the steps came: every layer keeps some of its history on the device
        assert bool((back.store.tier_of(layer) == 0).any(1).all())
    assert stats["evicted_bytes_device_to_disk"] > s.store.stats()["evicted_bytes_device_to_disk"]
    for i, f in enumerate(frames[6:], start=6):
        assert s.add_frame(f, float(i)).accepted and back.add_frame(f, float(i)).accepted
    assert _lengths(back) == _lengths(s)
    if policy == "full":  # exact whatever tier a page is in
        assert torch.allclose(_question_logits(back), _question_logits(s), atol=1e-5, rtol=1e-5)
