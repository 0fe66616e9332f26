"""The attention hook: where retrieval plugs into a stock transformers model.

No model code is forked. Two small pieces are enough on transformers 5.24:

1. **A registered attention function**, ``"vrex"`` in ``transformers.AttentionInterface``.
   The adapter sets the *text* decoder's ``config._attn_implementation`` to ``"vrex"``, so
   every decoder layer calls :func:`vrex_attention_forward` with the post-RoPE query
   ``[B, Hq, Tq, d]`` and the key/value that the cache's ``update()`` returned.

2. **A pass-through cache**, :class:`VrexCache`, given to the model as its cache argument. Its
   ``update()`` stores nothing and returns the *new* step's key/value unchanged, so the
   attention function sees only ``[B, Hkv, Tn, d]`` of the new tokens. The history lives in the
   policy. The cache only counts tokens (``get_seq_length()``, which transformers uses for
   default positions) and holds the session's running position (``next_position``), which the
   adapter uses to build position ids (1-D, or 3-D for Qwen's multimodal RoPE).

How the attention function reaches the policy: transformers forwards unknown keyword arguments
(``TransformersKwargs``) from the text model's ``forward`` down through every decoder layer into
the attention function, unchanged. The adapter calls the text model with
``vrex_policy=cache.policy``; the function reads it from its keyword arguments. No globals,
no context variables: two sessions on one model each pass their own cache and policy. Calling a
model whose attention is set to ``"vrex"`` without a policy raises a ``RuntimeError``.

Because the mask interface has no entry for ``"vrex"``, transformers builds no attention mask
for it; the policy applies causality over the new tokens itself. Sliding-window layers are not
supported (the adapter refuses such configs at load time).

The policy contract (batch 1, one call per decoder layer per forward)::

    class AttentionPolicy(Protocol):
        def attend(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
            # query [Hq, Tq, d]; key, value [Hkv, Tn, d] of the new tokens (Tq == Tn), post-RoPE.
            # Returns the attention output [Tq, Hq, d] over (history chosen by the policy) plus the
            # new tokens, causal among themselves. The policy also stores the new key/value so later
            # steps can attend to them. Hq is a multiple of Hkv (GQA: query head h reads KV head
            # h // (Hq // Hkv)).

``[Tq, Hq, d]`` is the per-row layout that transformers' own attention functions return
(``[B, Tq, Hq, d]``). With a batch of B > 1 rows (several sessions stepped together, equal Tq),
pass a sequence of B policies as ``vrex_policy``; row b goes to policy b.

:class:`FullAttentionPolicy` is the reference: it keeps all history in plain tensors and attends
to everything, so it is exact (tests check it against one unchunked forward with stock sdpa).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

ATTENTION_NAME = "vrex"


@runtime_checkable
class AttentionPolicy(Protocol):
    """Decides what each new step attends to and keeps the history. See the module docstring."""

    def attend(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor: ...


def causal_attention(query: Tensor, key: Tensor, value: Tensor, scaling: float, num_history: int) -> Tensor:
    """Attention of new queries over ``num_history`` leading keys plus the new keys, causally.

    Args:
        query: ``[Hq, Tq, d]``, the new tokens' queries.
        key, value: ``[Hkv, num_history + Tq, d]``; the last ``Tq`` rows are the new tokens.
        scaling: softmax scale (usually ``d ** -0.5``).
        num_history: how many leading key rows are history (all visible to every query).

    Returns:
        ``[Tq, Hq, d]``.
    """
    num_q_heads, num_queries, _ = query.shape
    num_kv_heads, num_keys, _ = key.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    group = num_q_heads // num_kv_heads
    if group > 1:
        key = key.repeat_interleave(group, dim=0)
        value = value.repeat_interleave(group, dim=0)
    mask = None
    if num_queries > 1:
        # query i (absolute index num_history + i) sees keys 0 .. num_history + i
        key_index = torch.arange(num_keys, device=query.device)
        query_index = torch.arange(num_queries, device=query.device) + num_history
        mask = key_index[None, :] <= query_index[:, None]  # [Tq, Tk]
    out = F.scaled_dot_product_attention(
        query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), attn_mask=mask, scale=scaling
    )  # [1, Hq, Tq, d]
    return out[0].transpose(0, 1)


class FullAttentionPolicy:
    """Keeps every past key/value of every layer and attends to all of it (exact reference).

    Storage per layer is a growing buffer ``[Hkv, capacity, d]`` that doubles when full, so a long
    stream costs amortised O(1) copies per token rather than a ``torch.cat`` of the whole history.
    """

    def __init__(self) -> None:
        self._keys: dict[int, Tensor] = {}
        self._values: dict[int, Tensor] = {}
        self._lengths: dict[int, int] = {}
        self.num_calls: dict[int, int] = {}  # per layer; tests use it to see the hook ran

    def num_tokens(self, layer: int = 0) -> int:
        """How many tokens layer ``layer`` holds."""
        return self._lengths.get(layer, 0)

    def history(self, layer: int) -> tuple[Tensor, Tensor]:
        """Stored keys and values of a layer, each ``[Hkv, T, d]`` (views, do not modify)."""
        length = self._lengths.get(layer, 0)
        if length == 0:
            raise KeyError(f"layer {layer} holds no tokens yet")
        return self._keys[layer][:, :length], self._values[layer][:, :length]

    def _append(self, layer: int, key: Tensor, value: Tensor) -> None:
        length = self._lengths.get(layer, 0)
        needed = length + key.shape[1]
        buffer = self._keys.get(layer)
        if buffer is None or buffer.shape[1] < needed:
            capacity = max(needed, 2 * (buffer.shape[1] if buffer is not None else 0), 64)
            new_keys = key.new_empty(key.shape[0], capacity, key.shape[2])
            new_values = value.new_empty(value.shape[0], capacity, value.shape[2])
            if length:
                new_keys[:, :length] = self._keys[layer][:, :length]
                new_values[:, :length] = self._values[layer][:, :length]
            self._keys[layer], self._values[layer] = new_keys, new_values
        self._keys[layer][:, length:needed] = key
        self._values[layer][:, length:needed] = value
        self._lengths[layer] = needed

    def attend(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
        num_history = self._lengths.get(layer, 0)
        self._append(layer, key, value)
        keys, values = self.history(layer)
        self.num_calls[layer] = self.num_calls.get(layer, 0) + 1
        return causal_attention(query, keys, values, scaling, num_history)


def vrex_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    vrex_policy: AttentionPolicy | Sequence[AttentionPolicy] | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The function registered as ``"vrex"``: hands each batch row to its policy.

    ``query`` is ``[B, Hq, Tq, d]``; ``key``/``value`` are ``[B, Hkv, Tn, d]`` of the new tokens
    (what :class:`VrexCache` returned). Returns ``([B, Tq, Hq, d], None)`` like transformers' sdpa.
    """
    if vrex_policy is None:
        raise RuntimeError(
            "attention implementation 'vrex' was called without a policy; run the model through "
            "ModelAdapter.forward (it passes vrex_policy=...), or set the attention back to 'sdpa'"
        )
    if key.shape[2] != query.shape[2]:
        raise RuntimeError(
            f"'vrex' attention expects only the new step's key/value ({query.shape[2]} tokens) but got "
            f"{key.shape[2]}; pass a VrexCache (not a DynamicCache) as the model's cache"
        )
    policies = [vrex_policy] if isinstance(vrex_policy, AttentionPolicy) else list(vrex_policy)
    if len(policies) != query.shape[0]:
        raise RuntimeError(f"batch has {query.shape[0]} rows but {len(policies)} policies were given")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = module.layer_idx
    rows = [policy.attend(layer, query[b], key[b], value[b], scaling) for b, policy in enumerate(policies)]
    return torch.stack(rows, dim=0), None


AttentionInterface.register(ATTENTION_NAME, vrex_attention_forward)


class _PassThroughLayer(CacheLayerMixin):
    """One layer of :class:`VrexCache`: counts tokens, stores nothing, returns the new key/value."""

    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.num_tokens = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.is_initialized = True
        self.num_tokens += key_states.shape[-2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.num_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.num_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.num_tokens = 0


class VrexCache(Cache):
    """A session's cache as transformers sees it: a token counter plus the attention policy.

    ``update()`` returns the new step's key/value unchanged (the policy keeps the history), so
    this cache is only meaningful with the ``"vrex"`` attention function.

    Attributes:
        policy: the :class:`AttentionPolicy` that stores history and computes attention.
        next_position: the running RoPE position where the next step starts (for Qwen2.5-VL's
            multimodal RoPE this is not the token count: an image advances it by
            ``max(grid_h, grid_w)``, not by its token count).
    """

    def __init__(self, policy: AttentionPolicy, num_layers: int) -> None:
        super().__init__(layers=[_PassThroughLayer() for _ in range(num_layers)])
        self.policy = policy
        self.next_position = 0
