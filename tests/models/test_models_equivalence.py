"""Chunked iterative prefill through the "vrex" hook equals one unchunked forward, per family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vrex.models.adapters import concat_steps, load_model
from vrex.models.attention import FullAttentionPolicy
from vrex.models.tiny import FAMILIES, tiny_random

MAX_RELATIVE_DIFF = 1e-4


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    torch.set_num_threads(1)
    return {
        family: tiny_random(family, seed=0, folder=tmp_path_factory.mktemp(family)) for family in FAMILIES
    }


def _frames(num_frames: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # odd sizes so Qwen's smart resize and the square resizes both do real work
    return [rng.integers(0, 256, (27 + 3 * i, 41, 3), dtype=np.uint8) for i in range(num_frames)]


def _chunks(adapter, family: str):
    """prefix, one frame, a chunk of two frames, one frame (or text chunks for a text-only LM)."""
    prefix = adapter.prompt_prefix()
    if family in ("llama", "qwen2"):
        parts = [adapter.text_embeds(f"chunk number {i} of the stream. ") for i in range(4)]
    else:
        parts = [adapter.frame_embeds(frame) for frame in _frames(4)]
    return [prefix, parts[0], concat_steps(parts[1:3], kind="frame"), parts[3]]


def _relative_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reference_attention", ["sdpa", "eager"])
def test_chunked_prefill_and_decode_match_one_forward(tiny_folders, family, reference_attention):
    adapter = load_model(tiny_folders[family])
    policy = FullAttentionPolicy()
    cache = adapter.new_cache(policy)
    steps = [*_chunks(adapter, family), adapter.question_input("What happens in the video?")]
    logits = [adapter.forward(step, cache) for step in steps]
    for _ in range(4):  # greedy decode
        token = int(logits[-1][0, -1].argmax())
        steps.append(adapter.token_input(token))
        logits.append(adapter.forward(steps[-1], cache))
    got = torch.cat(logits, dim=1)
    ref = adapter.reference_logits(steps, attn_implementation=reference_attention)

    num_tokens = sum(step.num_tokens for step in steps)
    assert got.shape == ref.shape == (1, num_tokens, adapter.lm_head.out_features)
    assert _relative_diff(got, ref) <= MAX_RELATIVE_DIFF
    # the hook really ran: every decoder layer saw every step, and holds every token
    assert policy.num_calls == {layer: len(steps) for layer in range(adapter.num_layers)}
    assert all(policy.num_tokens(layer) == num_tokens for layer in range(adapter.num_layers))
    assert cache.get_seq_length() == num_tokens
    assert cache.next_position == sum(step.position_advance for step in steps)


@pytest.mark.parametrize("family", FAMILIES)
def test_equivalence_check_can_fail(tiny_folders, family):
    """Sanity of the test above: dropping the history must break the match."""

    class ForgetfulPolicy(FullAttentionPolicy):
        def attend(self, layer, query, key, value, scaling):
            self._lengths[layer] = 0  # forget everything before this step
            return super().attend(layer, query, key, value, scaling)

    adapter = load_model(tiny_folders[family])
    cache = adapter.new_cache(ForgetfulPolicy())
    steps = [*_chunks(adapter, family), adapter.question_input("And then?")]
    got = torch.cat([adapter.forward(step, cache) for step in steps], dim=1)
    assert _relative_diff(got, adapter.reference_logits(steps)) > 1e-2


def test_last_logits_only_matches_full_logits(tiny_folders):
    adapter = load_model(tiny_folders["smolvlm"])
    frame = adapter.frame_embeds(_frames(1)[0])
    full = adapter.forward(frame, adapter.new_cache(FullAttentionPolicy()))
    last = adapter.forward(frame, adapter.new_cache(FullAttentionPolicy()), last_logits_only=True)
    assert last.shape == (1, 1, full.shape[-1])
    torch.testing.assert_close(last[0, 0], full[0, -1])


def test_two_sessions_on_one_model_do_not_mix(tiny_folders):
    """Position state and history live in each session's cache, not in the adapter."""
    adapter = load_model(tiny_folders["qwen2_5_vl"])
    frames = _frames(3, seed=1)
    cache_a, cache_b = adapter.new_cache(FullAttentionPolicy()), adapter.new_cache(FullAttentionPolicy())
    alone = adapter.new_cache(FullAttentionPolicy())
    expected = [adapter.forward(adapter.frame_embeds(f), alone) for f in frames]
    for frame, want in zip(frames, expected, strict=True):
        got = adapter.forward(adapter.frame_embeds(frame), cache_a)
        adapter.forward(adapter.frame_embeds(frame[::-1].copy()), cache_b)  # interleaved other session
        torch.testing.assert_close(got, want)
