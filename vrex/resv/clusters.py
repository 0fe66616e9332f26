"""The hash-cluster (HC) table of one layer and the clustering of a step's new keys.

A table has ``G`` groups: one when codes span all KV heads, one per KV head otherwise.
Each group holds its clusters' codes (the seed's code), per-KV-head running sums of member
keys (the representative is their mean), token counts, and which cluster each history
token belongs to (the member index; :meth:`HCTable.members` builds the CSR form).

Clustering a step is exact and vectorised. A new token may join an open cluster of earlier
steps or a cluster seeded by an earlier token of the same step; the second case makes
token t depend on tokens < t. Whether token t seeds a cluster follows
``seed[t] = no_old_match[t] and not any(seed[s] and match[t, s] for s < t)``, evaluated in one
host pass over the step's tokens (:func:`_seeds`). The membership test compares against each
cluster's representative as it stood at the start of the step (a new cluster's seed key), and
the size cap too is read at the start of the step, which keeps the result order-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .config import ResvConfig
from .hashing import BITS_PER_WORD, hash_codes, make_planes, num_words

_BIG = torch.iinfo(torch.int64).max


class _Rows:
    """A tensor that grows along dim 1 with amortised doubling."""

    def __init__(self, lead: tuple[int, ...], tail: tuple[int, ...], dtype: torch.dtype, device, fill=0):
        self.lead, self.tail, self.fill = lead, tail, fill
        self.buf = torch.full((*lead, 16, *tail), fill, dtype=dtype, device=device)
        self.n = 0

    def reserve(self, extra: int) -> None:
        need = self.n + extra
        cap = self.buf.shape[len(self.lead)]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        grown = torch.full(
            (*self.lead, new_cap, *self.tail), self.fill, dtype=self.buf.dtype, device=self.buf.device
        )
        grown.narrow(len(self.lead), 0, self.n).copy_(self.view)
        self.buf = grown

    @property
    def view(self) -> Tensor:
        return self.buf.narrow(len(self.lead), 0, self.n)

    def grow(self, extra: int) -> Tensor:
        """Extend by ``extra`` entries (filled) and return the whole live view."""
        self.reserve(extra)
        self.n += extra
        return self.view


# Longest step clustered in one piece: its [T, T] comparisons take ~4 bytes x T^2 per group
# and tensor (~70 MB per group at 2,048 tokens)
MAX_STEP_TOKENS = 2048


@dataclass
class StepClusters:
    """Result of clustering one step: the cluster of every new token, per KV head."""

    cluster_ids: Tensor  # [Hkv, T] int64 (equal rows when codes span all heads)
    new_clusters: Tensor  # [G] clusters created by this step


class HCTable:
    """Hash-cluster table of one decoder layer."""

    def __init__(self, num_kv_heads: int, head_dim: int, config: ResvConfig, layer: int, device="cpu"):
        self.cfg = config
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        per_head = config.scope == "per_head"
        self.groups = num_kv_heads if per_head else 1
        self.heads_per_group = 1 if per_head else num_kv_heads
        dim = head_dim * self.heads_per_group
        seeds = [config.seed * 1_000_003 + layer * 1_009 + g for g in range(self.groups)]
        self.planes = torch.stack([make_planes(dim, config.n_bits, s, device=device) for s in seeds])
        g, hg, d, w = self.groups, self.heads_per_group, head_dim, num_words(config.n_bits)
        self.codes = _Rows((g,), (w,), torch.int64, device)
        self.sums = _Rows((g,), (hg, d), torch.float32, device)
        self.counts = _Rows((g,), (), torch.int64, device)
        self.closed = _Rows((g,), (), torch.bool, device, fill=False)
        self.member_of = _Rows((g,), (), torch.int64, device)  # cluster of each history token
        self.track_bounds = config.estimator != "mean"
        if self.track_bounds:
            self.kmin = _Rows((g,), (hg, d), torch.float32, device, fill=float("inf"))
            self.kmax = _Rows((g,), (hg, d), torch.float32, device, fill=float("-inf"))
            self.sumsq = _Rows((g,), (hg,), torch.float32, device)
        self._csr: tuple[Tensor, Tensor] | None = None
        # +-1 bits of the cluster codes, extended lazily (codes never change once seeded)
        self._signs = _Rows((g,), (config.n_bits,), torch.float32, device)
        # representatives and their unit-length form (for the similarity floor), updated for
        # the clusters a step touched only
        self._means = _Rows((g,), (hg, d), torch.float32, device)
        self._unit = _Rows((g,), (hg, d), torch.float32, device)

    # -- sizes ---------------------------------------------------------------------------
    @property
    def num_clusters(self) -> int:
        return self.counts.n

    @property
    def num_tokens(self) -> int:
        return self.member_of.n

    def means(self) -> Tensor:
        """Representative keys ``[G, C, Hg, d]`` (kept current by :meth:`_append`; do not modify)."""
        if self._means.n != self.num_clusters:  # first use or after a restore: all of them
            c = self.counts.view.clamp_min(1).to(torch.float32)
            self._means.n = 0
            self._means.grow(self.num_clusters).copy_(self.sums.view / c[..., None, None])
        return self._means.view

    def open_mask(self) -> Tensor:
        """``[G, C]``: clusters that still accept members."""
        is_open = ~self.closed.view
        if self.cfg.max_cluster_tokens is not None:
            is_open = is_open & (self.counts.view < self.cfg.max_cluster_tokens)
        return is_open

    def close(self, group: int, cluster_ids: Tensor) -> None:
        """Close clusters (e.g. their tokens left the device tier)."""
        self.closed.view[group, cluster_ids] = True

    def overhead_bytes(self, kv_dtype_bytes: int = 2) -> int:
        """Bytes the table takes if stored like the KV cache: codes, representative keys,
        counts and 4-byte member indices."""
        c, n = self.num_clusters, self.num_tokens
        code_bytes = (self.cfg.n_bits + 7) // 8
        rep_bytes = self.heads_per_group * self.head_dim * kv_dtype_bytes
        return self.groups * (c * (code_bytes + rep_bytes + 4) + n * 4)

    def overhead_fraction(self, kv_dtype_bytes: int = 2) -> float:
        """Table bytes over the bytes of the K and V it indexes."""
        kv = 2 * self.num_tokens * self.num_kv_heads * self.head_dim * kv_dtype_bytes
        return self.overhead_bytes(kv_dtype_bytes) / kv if kv else 0.0

    # -- clustering -------------------------------------------------------------------------
    def _cluster_signs(self) -> Tensor:
        """``[G, C, n_bits]`` +-1 bits of every cluster's code."""
        have, c = self._signs.n, self.num_clusters
        if have < c:
            self._signs.grow(c - have)[:, have:] = _signs(self.codes.view[:, have:], self.cfg.n_bits)
        return self._signs.view

    def _unit_means(self) -> Tensor:
        """``[G, C, Hg, d]``: ``normalize(means())``, kept current by :meth:`_append`."""
        if self._unit.n != self.num_clusters:  # first use or after a restore: all of them
            self._unit.n = 0
            self._unit.grow(self.num_clusters).copy_(torch.nn.functional.normalize(self.means(), dim=-1))
        return self._unit.view

    def _group_keys(self, keys: Tensor) -> Tensor:
        """``[Hkv, T, d]`` -> ``[G, T, Hg, d]``."""
        hkv, t, d = keys.shape
        return keys.reshape(self.groups, self.heads_per_group, t, d).transpose(1, 2)

    def add(self, keys: Tensor) -> StepClusters:
        """Cluster a step's new post-RoPE keys ``[Hkv, T, d]`` and append them.

        A step compares its tokens with each other (``[T, T]`` per group), so one longer than
        ``MAX_STEP_TOKENS`` is clustered in chunks of that size, each against the clusters of
        the chunks before it as if they were earlier steps."""
        if keys.ndim != 3 or keys.shape[0] != self.num_kv_heads or keys.shape[2] != self.head_dim:
            raise ValueError(
                f"keys must be [{self.num_kv_heads}, T, {self.head_dim}], got {tuple(keys.shape)}"
            )
        t = keys.shape[1]
        if t == 0:
            empty = torch.zeros(self.num_kv_heads, 0, dtype=torch.int64, device=keys.device)
            return StepClusters(empty, torch.zeros(self.groups, dtype=torch.int64, device=keys.device))
        if t > MAX_STEP_TOKENS:
            parts = [self.add(chunk) for chunk in keys.split(MAX_STEP_TOKENS, dim=1)]
            return StepClusters(
                torch.cat([p.cluster_ids for p in parts], 1), sum(p.new_clusters for p in parts)
            )
        keys = keys.to(torch.float32)
        gk = self._group_keys(keys)  # [G, T, Hg, d]
        g, t = gk.shape[:2]
        codes = hash_codes(gk.reshape(g, t, -1), self.planes)
        # codes: [G, T, W]
        c_old = self.num_clusters
        th = self.cfg.hamming_threshold
        # Hamming distances as one small matmul of +-1 bit vectors: dot = n_bits - 2 * distance,
        # exact in float32; equal to hamming() (XOR + popcount), several times faster here
        signs = _signs(codes, self.cfg.n_bits)  # [G, T, n_bits]
        # only open clusters can take members: when most are closed (their tokens left the
        # device tier), compare against those columns alone; ascending, so ties still go to
        # the oldest cluster
        is_open = self.open_mask()
        cols = None
        any_open = is_open.any(0)
        if c_old and int(any_open.sum()) < 0.75 * c_old:
            cols = any_open.nonzero().squeeze(1)
            is_open = is_open[:, cols]
        old_signs = self._cluster_signs()
        dist_old = _sign_distance(
            signs, old_signs if cols is None else old_signs[:, cols], self.cfg.n_bits
        )  # [G, T, C or open columns]
        dist_new = _sign_distance(signs, signs, self.cfg.n_bits)  # [G, T, T]
        ok_old = (dist_old < th) & is_open[:, None, :]
        ok_new = dist_new < th
        ok_new &= torch.ones(t, t, dtype=torch.bool, device=keys.device).tril(-1)
        floor = self.cfg.similarity_floor
        if floor is not None:
            unit = torch.nn.functional.normalize(gk, dim=-1)
            ref_old = self._unit_means() if cols is None else self._unit_means()[:, cols]
            # all heads of a group must agree: the least similar head decides
            sim_old = torch.einsum("gthd,gchd->gtch", unit, ref_old).amin(-1)
            sim_new = torch.einsum("gthd,gshd->gtsh", unit, unit).amin(-1)
            ok_old &= sim_old >= floor
            ok_new &= sim_new >= floor
        seeded = _seeds(~ok_old.any(-1), ok_new)
        ok_new &= seeded[:, None, :]
        # pick: nearest code (or most similar key with a floor); ties -> oldest cluster
        if floor is not None:
            cost_old = torch.where(ok_old, -sim_old, torch.inf)
            cost_new = torch.where(ok_new, -sim_new, torch.inf)
        else:
            cost_old = torch.where(ok_old, dist_old, torch.inf)
            cost_new = torch.where(ok_new, dist_new, torch.inf)
        choice = torch.cat([cost_old, cost_new], -1).argmin(-1)  # [G, T]
        seed_rank = seeded.long().cumsum(-1) - 1  # id offset of each seed among the new clusters
        n_cols = cost_old.shape[-1]
        from_new = choice >= n_cols
        joined_new = c_old + seed_rank.gather(1, (choice - n_cols).clamp_min(0))
        joined_old = choice if cols is None or not n_cols else cols[choice.clamp_max(n_cols - 1)]
        cluster = torch.where(from_new, joined_new, joined_old)
        cluster = torch.where(seeded, c_old + seed_rank, cluster)
        n_new = seeded.sum(-1)  # [G]
        if t:
            self._append(gk, codes, cluster, seeded, n_new)
        ids = cluster.repeat_interleave(self.heads_per_group, dim=0)  # [Hkv, T]
        return StepClusters(cluster_ids=ids, new_clusters=n_new)

    def _append(self, gk: Tensor, codes: Tensor, cluster: Tensor, seeded: Tensor, n_new: Tensor) -> None:
        g, t = cluster.shape
        c_old = self.num_clusters
        max_new = int(n_new.max())
        # groups create different numbers of clusters; unused slots stay empty (count 0, closed)
        self.codes.grow(max_new)
        self.sums.grow(max_new)
        counts = self.counts.grow(max_new)
        closed = self.closed.grow(max_new)
        if max_new:
            slots = torch.arange(c_old, c_old + max_new, device=cluster.device)
            used = torch.arange(max_new, device=cluster.device)[None, :] < n_new[:, None]
            closed[:, slots] = ~used
            gi = torch.arange(g, device=cluster.device)[:, None].expand(g, t)
            self.codes.view[gi[seeded], cluster[seeded]] = codes[seeded]
        counts.scatter_add_(1, cluster, torch.ones_like(cluster))
        idx = cluster[:, :, None, None].expand_as(gk)
        self.sums.view.scatter_add_(1, idx, gk)
        if self.track_bounds:
            self.kmin.grow(max_new)
            self.kmax.grow(max_new)
            self.sumsq.grow(max_new)
            self.kmin.view.scatter_reduce_(1, idx, gk, "amin")
            self.kmax.view.scatter_reduce_(1, idx, gk, "amax")
            self.sumsq.view.scatter_add_(1, cluster[:, :, None].expand(gk.shape[:3]), (gk * gk).sum(-1))
        self.member_of.grow(t)[:, -t:] = cluster
        self._csr = None
        keep_means = self._means.n == c_old
        keep_unit = self.cfg.similarity_floor is not None and self._unit.n == c_old
        if keep_means or keep_unit:
            gi = torch.arange(g, device=cluster.device)[:, None].expand(g, t)
            cnt = self.counts.view[gi, cluster].clamp_min(1).to(torch.float32)
            mean = self.sums.view[gi, cluster] / cnt[..., None, None]
            if keep_means:
                self._means.grow(max_new)[gi, cluster] = mean  # unused slots stay 0 = 0 / 1
            if keep_unit:
                self._unit.grow(max_new)[gi, cluster] = torch.nn.functional.normalize(mean, dim=-1)

    def members(self) -> tuple[Tensor, Tensor]:
        """CSR form per group: ``(offsets [G, C+1], tokens [G, N])`` with cluster c's history
        positions at ``tokens[g, offsets[g, c]:offsets[g, c+1]]`` in ascending order."""
        if self._csr is None:
            member = self.member_of.view
            order = torch.argsort(member, dim=1, stable=True)
            counts = torch.zeros(self.groups, self.num_clusters, dtype=torch.int64, device=member.device)
            counts.scatter_add_(1, member, torch.ones_like(member))
            offsets = torch.nn.functional.pad(counts.cumsum(1), (1, 0))
            self._csr = (offsets, order)
        return self._csr

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        state = {
            "codes": self.codes.view,
            "sums": self.sums.view,
            "counts": self.counts.view,
            "closed": self.closed.view,
            "member_of": self.member_of.view,
            "planes": self.planes,
        }
        if self.track_bounds:
            state.update(kmin=self.kmin.view, kmax=self.kmax.view, sumsq=self.sumsq.view)
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore ``state_dict()`` of a table built with the same shape and ResvConfig."""
        device = self.planes.device
        if tuple(state["planes"].shape) != tuple(self.planes.shape):
            raise ValueError(
                f"this HC-table state has hyperplanes {tuple(state['planes'].shape)} (groups, dim, "
                f"n_bits), the table {tuple(self.planes.shape)}: build it with the ResvConfig "
                "(scope, n_bits) and head shape it was saved with"
            )
        if self.track_bounds and "kmin" not in state:
            raise ValueError(
                f"this HC-table state has no key bounds, which estimator {self.cfg.estimator!r} "
                "needs: it was saved with estimator 'mean'"
            )
        self.planes = state["planes"].to(device)
        names = ["codes", "sums", "counts", "closed", "member_of"]
        if self.track_bounds:
            names += ["kmin", "kmax", "sumsq"]
        for name in names:
            rows: _Rows = getattr(self, name)
            value = state[name].to(device)
            rows.n = 0
            rows.grow(value.shape[1]).copy_(value)
        self._csr = None
        self._signs.n = 0
        self._means.n = 0
        self._unit.n = 0


def _seeds(no_old: Tensor, match: Tensor) -> Tensor:
    """``seed[t] = no_old[t] and not any(seed[s] and match[t, s] for s < t)`` per group.

    One pass over the step's tokens on the host: the recurrence is sequential, and the vector
    fixed point it replaces took about 20 rounds of device operations, each with a host sync.
    ``no_old``: ``[G, T]``; ``match``: ``[G, T, T]`` (only ``s < t`` is read). Returns ``[G, T]``."""
    free = no_old.cpu().numpy()
    links = match.cpu().numpy()
    seeded = np.zeros_like(free)
    for t in range(free.shape[1]):
        seeded[:, t] = free[:, t] & ~(links[:, t, :t] & seeded[:, :t]).any(-1)
    return torch.from_numpy(seeded).to(no_old.device, non_blocking=True)


def _signs(codes: Tensor, n_bits: int) -> Tensor:
    """Packed codes ``[..., W]`` -> their ``n_bits`` bits as +-1.0 ``[..., n_bits]``."""
    shifts = torch.arange(BITS_PER_WORD, device=codes.device)
    bits = (codes[..., None] >> shifts) & 1  # [..., W, 32]
    bits = bits.reshape(*codes.shape[:-1], -1)[..., :n_bits]
    return bits.to(torch.float32) * 2 - 1


def _sign_distance(a: Tensor, b: Tensor, n_bits: int) -> Tensor:
    """Hamming distances ``[G, Ta, Tb]`` (float32, exact integers) between +-1 bit rows."""
    return (n_bits - a @ b.transpose(1, 2)) * 0.5


def cluster_scores(table: HCTable, query: Tensor, scaling: float) -> Tensor:
    """Estimated scores of query rows against clusters: ``[Hkv, Hq/Hkv * Tq, C]``.

    query: ``[Hq, Tq, d]`` post-RoPE. Estimators: ``mean`` is q·k̄; ``bound`` is the
    per-channel upper bound from member min/max (as Quest does for pages); ``radius`` adds
    ``‖q‖·r`` with r the RMS distance of members to the mean.
    """
    hq, tq, d = query.shape
    hkv = table.num_kv_heads
    # scaled before the products: a pass over [R, d] instead of [R, C] (the scaling is positive)
    q = (query.to(torch.float32) * scaling).reshape(hkv, hq // hkv, tq, d).reshape(hkv, -1, d)
    g, hg = table.groups, table.heads_per_group
    q = q.reshape(g, hg, -1, d)  # [G, Hg, R, d]
    est = table.cfg.estimator
    if est == "bound":
        lo, hi = table.kmin.view, table.kmax.view  # [G, C, Hg, d]
        qe = q[:, :, :, None, :]  # [G, Hg, R, 1, d]
        s = torch.maximum(
            qe * lo.permute(0, 2, 1, 3)[:, :, None], qe * hi.permute(0, 2, 1, 3)[:, :, None]
        ).sum(-1)
    else:
        s = torch.einsum("ghrd,gchd->ghrc", q, table.means())
        if est == "radius":
            cnt = table.counts.view.clamp_min(1).to(torch.float32)[..., None]  # [G, C, 1]
            mean_sq = (table.means() ** 2).sum(-1)  # [G, C, Hg]
            r = (table.sumsq.view / cnt - mean_sq).clamp_min(0).sqrt()  # [G, C, Hg]
            s = s + q.norm(dim=-1)[..., None] * r.permute(0, 2, 1)[:, :, None, :]
    return s.reshape(hkv, -1, s.shape[-1])
