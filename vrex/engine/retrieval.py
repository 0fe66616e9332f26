"""The attention policy that joins ReSV (or a baseline selector) to the tiered KV store.

Per decoder layer and step (see ``vrex.models.attention`` for the contract):
select history tokens with the step's queries -> fetch them from whichever tier holds them ->
attend over them plus the step's own tokens (causal). Once the whole forward has run,
``end_step`` clusters every layer's new keys and stores them in their clusters' pages: a layer
reads only its own history, so nothing needs them sooner, and a forward that fails half-way
leaves the session as it was. What happened is kept per layer and KV head for stats and the
trace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from vrex.kv import DEVICE, DISK, HOST, TieredKVStore
from vrex.resv import Selector


class PartialStepError(RuntimeError):
    """Writing a step's keys failed after some layers took them: the session's history is no
    longer the same in every layer (a disk that filled up half-way, say), so it cannot go on."""


def light_attention(
    query: Tensor, hist_k: Tensor, hist_v: Tensor, lengths: Tensor, key: Tensor, value: Tensor, scaling: float
) -> Tensor:
    """Attention of new queries ``[Hq, T, d]`` over each KV head's own padded history
    (``[Hkv, L, d]``, ``lengths`` valid rows) plus the new keys (causal). Returns ``[T, Hq, d]``.

    GQA without copies: the query heads of a KV head are a second batch dim and the keys are
    broadcast to them (a view), so neither K/V nor the mask is repeated per query head. The
    mask is built once per KV head as the additive 0 / -inf bias sdpa would make of it."""
    attend = _light_attention_per_head if key.device.type == "cpu" else _light_attention_batched
    return attend(query, hist_k, hist_v, lengths, key, value, scaling)


def _light_attention_batched(
    query: Tensor, hist_k: Tensor, hist_v: Tensor, lengths: Tensor, key: Tensor, value: Tensor, scaling: float
) -> Tensor:
    """:func:`light_attention` for all KV heads in one call (one launch on a GPU)."""
    hq, t, d = query.shape
    hkv, hist_len = hist_k.shape[0], hist_k.shape[1]
    group = hq // hkv
    k = torch.cat([hist_k.to(key.dtype), key], 1)
    v = torch.cat([hist_v.to(value.dtype), value], 1)
    # written straight into the bias: only the causal corner and any padding get -inf
    bias = torch.zeros(hkv, t, hist_len + t, dtype=query.dtype, device=key.device)
    later = torch.ones(t, t, dtype=torch.bool, device=key.device).triu(1)
    bias[:, :, hist_len:].masked_fill_(later, -torch.inf)
    if hist_len and bool((lengths < hist_len).any()):  # lengths live on the host: no device sync
        lengths = lengths.to(key.device)
        padding = torch.arange(hist_len, device=key.device)[None, :] >= lengths[:, None]  # [Hkv, L]
        bias[:, :, :hist_len].masked_fill_(padding[:, None, :], -torch.inf)
    out = F.scaled_dot_product_attention(
        query.view(hkv, group, t, d),
        k[:, None].expand(hkv, group, -1, d),
        v[:, None].expand(hkv, group, -1, d),
        attn_mask=bias[:, None],
        scale=scaling,
    )
    return out.reshape(hq, t, d).transpose(0, 1)


def _light_attention_per_head(
    query: Tensor, hist_k: Tensor, hist_v: Tensor, lengths: Tensor, key: Tensor, value: Tensor, scaling: float
) -> Tensor:
    """:func:`light_attention` one KV head at a time (CPU): each head attends to its own
    history length, so no padding is computed or masked, and the bias is only the causal
    corner (none for one query token). 1.1-1.3x the batched call on a CPU; a GPU keeps one
    launch for all heads."""
    hq, t, d = query.shape
    hkv = hist_k.shape[0]
    group = hq // hkv
    later = torch.ones(t, t, dtype=torch.bool).triu(1)
    out = torch.empty(hq, t, d, dtype=query.dtype)
    for h, n in enumerate(lengths.tolist()):
        k = torch.cat([hist_k[h, :n].to(key.dtype), key[h]])
        v = torch.cat([hist_v[h, :n].to(value.dtype), value[h]])
        bias = None
        if t > 1:
            bias = torch.zeros(t, n + t, dtype=query.dtype)
            bias[:, n:].masked_fill_(later, -torch.inf)
        heads = slice(h * group, (h + 1) * group)
        out[heads] = F.scaled_dot_product_attention(
            query[heads][None],
            k[None, None].expand(1, group, -1, d),
            v[None, None].expand(1, group, -1, d),
            attn_mask=bias,
            scale=scaling,
        )[0]
    return out.transpose(0, 1)


@dataclass
class StepRecord:
    """What one forward step did, per layer and KV head, and where its time went."""

    stage: str
    new_tokens: int = 0
    history_tokens: int = 0
    layers: list[dict] = field(default_factory=list)
    select_ms: float = 0.0
    fetch_ms: float = 0.0
    attention_ms: float = 0.0
    store_ms: float = 0.0
    bytes_device: int = 0
    bytes_host: int = 0
    bytes_disk: int = 0

    def fetched_fraction(self) -> float:
        sel = sum(h["selected_tokens"] for layer in self.layers for h in layer["heads"])
        hist = sum(h["history_tokens"] for layer in self.layers for h in layer["heads"])
        return sel / hist if hist else 0.0

    def per_layer_fraction(self) -> list[float]:
        out = []
        for layer in self.layers:
            hist = sum(h["history_tokens"] for h in layer["heads"])
            out.append(sum(h["selected_tokens"] for h in layer["heads"]) / hist if hist else 0.0)
        return out


class RetrievalPolicy:
    """Selection + tiered store behind the attention hook, for one session."""

    def __init__(self, selector: Selector, store: TieredKVStore, *, track_evictions: bool = True):
        self.selector = selector
        self.store = store
        self.track_evictions = track_evictions and selector.name == "resv"
        self.token_bytes_per_head = 2 * store.head_dim * store.dtype.itemsize
        self.record = StepRecord(stage="frame")
        self._moved_down = 0
        self._new_kv: list[tuple[int, Tensor, Tensor]] = []  # (layer, key, value) to store at end_step

    def begin_step(self, stage: str, new_tokens: int) -> None:
        """Start a step; a step the device budget may not hold is refused here, before any
        layer changes the selector or the store (`StepTooLargeError`)."""
        self.store.check_step(new_tokens, one_page_per_step=self.selector.one_page_per_step)
        self.record = StepRecord(stage=stage, new_tokens=new_tokens, history_tokens=self.store.length(0))
        self._new_kv = []

    def attend(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
        rec = self.record
        store = self.store
        n = store.length(layer)
        t0 = time.perf_counter()
        sel = self.selector.select(layer, query, n, scaling, self.record.stage)
        t1 = time.perf_counter()
        if self.selector.name == "full":
            everything = torch.arange(n, dtype=torch.int64)
            fetched = store.fetch(layer, [everything] * store.num_kv_heads)
        else:
            fetched = store.fetch(layer, sel.positions())
        # where each selected token was, only when some came from below the device tier
        tiers = store.tier_of(layer) if fetched.bytes_host or fetched.bytes_disk else None
        t2 = time.perf_counter()
        out = light_attention(query, fetched.keys, fetched.values, fetched.lengths, key, value, scaling)
        t3 = time.perf_counter()
        self._new_kv.append((layer, key, value))
        rec.select_ms += (t1 - t0) * 1e3
        rec.fetch_ms += (t2 - t1) * 1e3
        rec.attention_ms += (t3 - t2) * 1e3
        rec.layers.append(self._layer_record(layer, n, sel, tiers))
        return out

    def _layer_record(self, layer: int, n: int, sel, tiers: Tensor | None) -> dict:
        selected = sel.token_mask.sum(1)
        if tiers is not None:  # [Hkv, N] tier of every history token
            tiers = tiers.to(sel.token_mask.device)
            per_tier = [((tiers == t) & sel.token_mask).sum(1).tolist() for t in (DEVICE, HOST, DISK)]
        else:  # all of it was on the device: no need to look up where each token lives
            zeros = [0] * selected.shape[0]
            per_tier = [selected.tolist(), zeros, zeros]
        clusters = sel.clusters.tolist() if sel.clusters is not None else None
        chosen = sel.selected_clusters.tolist() if sel.selected_clusters is not None else None
        heads = []
        tb = self.token_bytes_per_head
        for h, count in enumerate(selected.tolist()):
            moved = {"device": per_tier[0][h] * tb, "host": per_tier[1][h] * tb, "disk": per_tier[2][h] * tb}
            self.record.bytes_device += moved["device"]
            self.record.bytes_host += moved["host"]
            self.record.bytes_disk += moved["disk"]
            heads.append(
                {
                    "kv_head": h,
                    "history_tokens": n,
                    "clusters": int(clusters[h]) if clusters is not None else 0,
                    "selected_clusters": int(chosen[h]) if chosen is not None else 0,
                    "selected_tokens": int(count),
                    "early_exit_fraction": sel.early_exit_fraction,
                    "bytes": moved,
                }
            )
        return {"layer": layer, "heads": heads}

    def abort_step(self) -> None:
        """Drop what a failed step would have stored."""
        self._new_kv = []

    @torch.inference_mode()
    def end_step(self) -> StepRecord:
        """Store the step's new keys and values of every layer (the selector names their
        pages), then close the clusters whose pages left the device tier: only device-resident
        clusters take new members (DESIGN.md), so a page never has to be fetched back to grow.

        Raises:
            PartialStepError: storing failed after a layer had changed (see its cause).
        """
        t0 = time.perf_counter()
        pending, self._new_kv = self._new_kv, []
        if pending:  # evictions first: one that fails (a full disk) fails the step with nothing changed
            self.store.make_room_for_step(
                self.record.new_tokens, one_page_per_step=self.selector.one_page_per_step
            )
        for done, (layer, key, value) in enumerate(pending):
            observed = False
            try:
                ids = self.selector.observe(layer, key)
                observed = True
                self.store.append(layer, key, value, ids)
            except Exception as err:
                if not (done or observed):
                    raise  # nothing changed: the step simply did not happen
                raise PartialStepError(
                    f"storing the step's keys failed at layer {layer} after {done} of {len(pending)} "
                    f"layers took them ({type(err).__name__}: {err})"
                ) from err
        self.record.store_ms += (time.perf_counter() - t0) * 1e3
        # nothing ever leaves an unbounded device tier
        if self.track_evictions and self.store.budgets.device_bytes is not None:
            stats = self.store.stats()
            moved = sum(v for k, v in stats.items() if k.startswith("evicted_bytes_device"))
            if moved != self._moved_down:
                try:
                    for layer in range(self.store.num_layers):
                        for h in range(self.store.num_kv_heads):
                            off = self.store.cluster_tier(layer, h).off_device()
                            if off.numel():
                                self.selector.on_evicted(layer, h, off)
                except Exception as err:  # the step is stored: it cannot be undone now
                    raise PartialStepError(
                        f"the step was stored but closing the clusters that left the device tier failed "
                        f"({type(err).__name__}: {err})"
                    ) from err
                self._moved_down = moved
        return self.record
