"""One forward over the steps of several sessions (cross-session batched prefill).

The text decoder runs once on ``inputs_embeds [B, T, H]``; every decoder layer hands row b to
session b's retrieval policy (``vrex_policy=[policy_1, ..., policy_B]``, see
``vrex.models.attention``), so selection, fetch, light attention and the KV store stay per
session while the projections and the MLP run as one batch. Rows must have equal token counts.

This is ``ModelAdapter.forward`` for B rows: the same call into the adapter's language model,
with per-row position ids, and each session's cache advanced as if it had run alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vrex.models.adapters import ModelAdapter, StepInput
from vrex.models.attention import VrexCache


def forward_batch(
    adapter: ModelAdapter,
    steps: Sequence[StepInput],
    caches: Sequence[VrexCache],
    *,
    last_logits_only: bool = True,
) -> Tensor:
    """Run the text decoder once on ``len(steps)`` sessions' steps.

    Args:
        adapter: the model adapter all sessions share.
        steps: one step per session, all with the same number of tokens.
        caches: each session's cache (its policy and running position), in the same order.
        last_logits_only: logits of the last token of each row only.

    Returns:
        Logits ``[B, T or 1, vocab]``, float32; row b belongs to ``caches[b]``.

    Raises:
        ValueError: no steps, mismatched lengths, or rows of different token counts.
    """
    if not steps or len(steps) != len(caches):
        raise ValueError(f"need one cache per step, got {len(steps)} steps and {len(caches)} caches")
    num_tokens = steps[0].num_tokens
    if any(step.num_tokens != num_tokens for step in steps):
        raise ValueError(
            f"rows of a batch must have the same token count, got {[s.num_tokens for s in steps]}"
        )
    if len(steps) == 1:
        return adapter.forward(steps[0], caches[0], last_logits_only=last_logits_only)
    # [1, T] per row -> [B, T]; Qwen's multimodal [3, 1, T] -> [3, B, T]
    positions = [
        adapter.position_ids(step, cache.next_position) for step, cache in zip(steps, caches, strict=True)
    ]
    position_ids = torch.cat(positions, dim=-2)
    embeds = torch.cat([step.inputs_embeds.to(adapter.device, adapter.dtype) for step in steps], dim=0)
    # The decoder's cache only passes the new K/V through (the policies keep the history); a
    # scratch one serves the whole batch and each session's own counters are advanced below.
    scratch = VrexCache(None, adapter.num_layers)
    with torch.inference_mode():
        out = adapter.language_model(
            inputs_embeds=embeds,
            position_ids=position_ids,
            use_cache=True,
            vrex_policy=[cache.policy for cache in caches],
            **{adapter.cache_kwarg: scratch},
        )
        hidden = out.last_hidden_state
        if last_logits_only:
            hidden = hidden[:, -1:]
        logits = adapter.lm_head(hidden).float()
    for step, cache in zip(steps, caches, strict=True):
        for layer in cache.layers:
            layer.num_tokens += num_tokens
        cache.next_position += step.position_advance
    return logits
