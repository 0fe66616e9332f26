"""Selectors: which history tokens each KV head of a layer attends to in a step.

Every selector sees the same two calls per layer and step, in this order:

- ``select(layer, query, history_len, scaling, stage)`` with the step's post-RoPE queries
  ``[Hq, Tq, d]`` and, when known, its stage (``frame`` / ``text`` / ``decode``) -> a
  :class:`Selection` over the ``history_len`` earlier tokens;
- ``observe(layer, keys)`` with the step's new post-RoPE keys ``[Hkv, T, d]`` -> the page
  (cluster) id of each new token per KV head, which the KV store uses to keep a cluster's
  tokens together.

Sink tokens (the start of the stream) and a recent window are always attended; the step's
own tokens are attended by the caller. Names: ``full``, ``window`` (StreamingLLM),
``topk`` (exact scores, InfiniGen-like oracle), ``rekv`` (top frames by mean key, shared by
the heads of a layer), ``resv``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vrex.limits import POLICIES

from .clusters import HCTable, cluster_scores
from .config import DEFAULT, ResvConfig, _int_in, preset
from .wicsum import CANDIDATE_MIN_ROWS, wicsum_select, wicsum_select_bucketed

# exp() of float32 inputs below about -87.3 (results under the smallest normal float) takes a
# scalar slow path on CPU, ~50x slower per element; scores that far below the row's max are
# lifted to it. Their weight (e^-87 ~ 1.6e-38 per token) changes no cut short of ratio 1.
EXP_FLOOR = -87.0


@dataclass(frozen=True)
class SelectorConfig:
    policy: str = "resv"
    sink_tokens: int = 4
    recent_tokens: int = 64
    resv: ResvConfig = DEFAULT
    budget_fraction: float = 0.1  # topk / rekv: share of the history fetched per KV head

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.sink_tokens < 0 or self.recent_tokens < 0:
            raise ValueError("sink_tokens and recent_tokens must be >= 0")
        if not 0.0 < self.budget_fraction <= 1.0:
            raise ValueError(f"budget_fraction must be in (0, 1], got {self.budget_fraction}")
        if isinstance(self.resv, str):  # a preset by name
            object.__setattr__(self, "resv", preset(self.resv))
        if not isinstance(self.resv, ResvConfig):
            raise ValueError(f"resv must be a ResvConfig or a preset name, got {type(self.resv).__name__}")

    def replace(self, **changes: object) -> SelectorConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class Selection:
    """History tokens chosen per KV head, plus what the trace records about the choice."""

    token_mask: Tensor  # [Hkv, N] bool
    clusters: Tensor | None = None  # [Hkv] clusters scored
    selected_clusters: Tensor | None = None  # [Hkv]
    early_exit_fraction: float | None = None  # bucketed WiCSum: share of each row processed
    extra: dict = field(default_factory=dict)

    @property
    def history_len(self) -> int:
        return self.token_mask.shape[1]

    @property
    def selected_tokens(self) -> Tensor:
        return self.token_mask.sum(1)

    def fetched_fraction(self) -> float:
        n = self.history_len
        return float(self.selected_tokens.float().mean() / n) if n else 0.0

    def positions(self) -> list[Tensor]:
        """Sorted history positions per KV head, on the host (where the KV store indexes).

        One ``nonzero`` over all heads and one copy: on a GPU, a sync per step, not per head."""
        hits = self.token_mask.nonzero().cpu()  # [K, 2] (head, position), heads in order
        counts = torch.bincount(hits[:, 0], minlength=self.token_mask.shape[0]).tolist()
        return list(hits[:, 1].split(counts))


STAGES = ("frame", "text", "decode")


class Selector:
    """Full attention, and the base of every selector: always-attended tokens (sinks and the
    recent window), argument checks and bookkeeping; subclasses add the retrieval."""

    name = "full"
    state_keys: tuple[str, ...] = ("steps",)
    # observe gives each step's tokens one new page id per KV head (the store sizes a step's
    # worst case by it); ReSV's clusters take tokens of many steps
    one_page_per_step = True

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        config: SelectorConfig | None = None,
        device: torch.device | str = "cpu",
    ):
        for name, value in (
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            _int_in(name, value, 1, None)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.cfg = config or SelectorConfig(policy=self.name)
        self.num_layers, self.num_heads = num_layers, num_heads
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.device = torch.device(device)
        self.steps = [0] * num_layers

    def _check(
        self,
        layer: int,
        query: Tensor | None = None,
        history_len: int | None = None,
        stage: str | None = None,
    ) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if query is not None and (
            query.ndim != 3 or query.shape[0] != self.num_heads or query.shape[2] != self.head_dim
        ):
            raise ValueError(
                f"query must be [{self.num_heads}, Tq, {self.head_dim}], got {tuple(query.shape)}"
            )
        if history_len is not None and history_len < 0:
            raise ValueError(f"history_len must be >= 0, got {history_len}")
        if stage is not None and stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)} or None, got {stage!r}")

    def _check_keys(self, keys: Tensor) -> None:
        if keys.ndim != 3 or keys.shape[0] != self.num_kv_heads or keys.shape[2] != self.head_dim:
            raise ValueError(
                f"keys must be [{self.num_kv_heads}, T, {self.head_dim}], got {tuple(keys.shape)}"
            )

    def always_mask(self, history_len: int) -> Tensor:
        pos = torch.arange(history_len, device=self.device)
        keep = (pos < self.cfg.sink_tokens) | (pos >= history_len - self.cfg.recent_tokens)
        return keep.unsqueeze(0).expand(self.num_kv_heads, -1).clone()

    def select(
        self, layer: int, query: Tensor, history_len: int, scaling: float, stage: str | None = None
    ) -> Selection:
        """Which of the ``history_len`` earlier tokens each KV head of ``layer`` attends to.

        ``query``: the step's post-RoPE queries ``[num_heads, Tq, head_dim]``; ``scaling``: the
        attention's score scale (1/sqrt(head_dim) for most models); ``stage``: ``frame``,
        ``text`` or ``decode`` when known (ReSV picks its ratio by it). Call before the step's
        own keys are observed."""
        self._check(layer, query, history_len, stage)
        return Selection(torch.ones(self.num_kv_heads, history_len, dtype=torch.bool, device=self.device))

    def observe(self, layer: int, keys: Tensor) -> Tensor:
        """Record a step's new post-RoPE keys ``[num_kv_heads, T, head_dim]``; returns each new
        token's page id per KV head ``[num_kv_heads, T]`` (whole steps unless a subclass
        clusters). Nothing changes when the arguments are refused."""
        self._check(layer)
        self._check_keys(keys)
        step = self.steps[layer]
        self.steps[layer] += 1
        return torch.full(keys.shape[:2], step, dtype=torch.int64, device=keys.device)

    def on_evicted(self, layer: int, kv_head: int, page_ids: Tensor) -> None:
        """Pages left the device tier (ReSV closes those clusters)."""

    def state_dict(self) -> dict:
        return {"steps": list(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned, into a selector built with the same
        arguments and config (a mismatch raises a ValueError saying which)."""
        missing = [k for k in self.state_keys if k not in state]
        if missing:
            raise ValueError(
                f"this state has no {', '.join(missing)}: it was saved by another policy than {self.name!r}"
            )
        if len(state["steps"]) != self.num_layers:
            raise ValueError(f"this state has {len(state['steps'])} layers, the selector {self.num_layers}")
        self.steps = list(state["steps"])


class FullSelector(Selector):
    """Every history token (the reference the others are measured against)."""

    name = "full"


class WindowSelector(Selector):
    """StreamingLLM-like: only the sinks and the recent window."""

    name = "window"

    def select(
        self, layer: int, query: Tensor, history_len: int, scaling: float, stage: str | None = None
    ) -> Selection:
        self._check(layer, query, history_len, stage)
        return Selection(self.always_mask(history_len))


class _KeyKeeper(Selector):
    """Keeps its own copy of every history key (what the oracle baselines score against)."""

    state_keys = ("steps", "keys")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.keys: list[list[Tensor]] = [[] for _ in range(self.num_layers)]

    def observe(self, layer: int, keys: Tensor) -> Tensor:
        ids = super().observe(layer, keys)  # checks first
        self.keys[layer].append(keys.detach().to(self.device, torch.float32))
        return ids

    def history_keys(self, layer: int) -> Tensor:
        chunks = self.keys[layer]
        if len(chunks) > 1:
            self.keys[layer] = chunks = [torch.cat(chunks, 1)]
        return chunks[0] if chunks else torch.zeros(self.num_kv_heads, 0, self.head_dim, device=self.device)

    def _grouped(self, query: Tensor) -> Tensor:
        hq, tq, d = query.shape
        return query.to(self.device, torch.float32).reshape(
            self.num_kv_heads, hq // self.num_kv_heads * tq, d
        )

    def _checked_keys(self, layer: int, query: Tensor, history_len: int, stage: str | None) -> Tensor | None:
        """The first ``history_len`` stored keys of ``layer``; None when nothing is scored."""
        self._check(layer, query, history_len, stage)
        keys = self.history_keys(layer)
        if history_len > keys.shape[1]:
            raise ValueError(
                f"layer {layer}: history_len {history_len} but {keys.shape[1]} keys were observed"
            )
        return keys[:, :history_len] if history_len and query.shape[1] else None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "keys": [self.history_keys(i).cpu() for i in range(self.num_layers)]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.keys = [[k.to(self.device)] for k in state["keys"]]


class TopKSelector(_KeyKeeper):
    """Per KV head, the history tokens with the largest exact attention probability in any
    of the step's query rows (an oracle: it reads every key)."""

    name = "topk"

    def select(
        self, layer: int, query: Tensor, history_len: int, scaling: float, stage: str | None = None
    ) -> Selection:
        keys = self._checked_keys(layer, query, history_len, stage)
        mask = self.always_mask(history_len)
        k = min(history_len, max(1, round(self.cfg.budget_fraction * history_len)))
        if keys is not None:
            s = torch.einsum("hrd,hnd->hrn", self._grouped(query), keys) * scaling
            prob = torch.softmax(s, -1).amax(1)  # [Hkv, N]
            mask.scatter_(1, prob.topk(k, dim=1).indices, True)
        return Selection(mask)


class RekvSelector(_KeyKeeper):
    """ReKV-like: frames (steps) ranked by their mean key against the step's queries, the
    score averaged over all rows and heads so every KV head of the layer gets the same frames."""

    name = "rekv"
    state_keys = ("steps", "keys", "frame_starts")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.frame_starts: list[list[int]] = [[] for _ in range(self.num_layers)]

    def observe(self, layer: int, keys: Tensor) -> Tensor:
        ids = super().observe(layer, keys)  # checks, then stores the keys
        self.frame_starts[layer].append(sum(k.shape[1] for k in self.keys[layer]) - keys.shape[1])
        return ids

    def select(
        self, layer: int, query: Tensor, history_len: int, scaling: float, stage: str | None = None
    ) -> Selection:
        keys = self._checked_keys(layer, query, history_len, stage)
        mask = self.always_mask(history_len)
        if keys is None:
            return Selection(mask)
        starts = torch.tensor([s for s in self.frame_starts[layer] if s < history_len], device=self.device)
        ends = torch.cat([starts[1:], torch.tensor([history_len], device=self.device)])
        frame_of = torch.bucketize(torch.arange(history_len, device=self.device), starts, right=True) - 1
        sums = torch.zeros(self.num_kv_heads, len(starts), self.head_dim, device=self.device)
        sums.index_add_(1, frame_of, keys)
        means = sums / (ends - starts).clamp_min(1)[None, :, None]
        score = torch.einsum("hrd,hfd->hrf", self._grouped(query), means).mean((0, 1))  # [F]
        budget = self.cfg.budget_fraction * history_len
        order = score.argsort(descending=True)
        sizes = (ends - starts)[order]
        take = order[(sizes.cumsum(0) - sizes) < budget]  # frames until the budget is filled
        chosen = torch.zeros(len(starts), dtype=torch.bool, device=self.device)
        chosen[take] = True
        mask |= chosen[frame_of].unsqueeze(0)
        return Selection(mask, extra={"frames": len(starts), "selected_frames": int(chosen.sum())})

    def state_dict(self) -> dict:
        return {**super().state_dict(), "frame_starts": [list(s) for s in self.frame_starts]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.frame_starts = [list(s) for s in state["frame_starts"]]


class ResvSelector(Selector):
    """ReSV: hash-bit clusters of keys, scored by representative, thresholded by WiCSum."""

    name = "resv"
    one_page_per_step = False
    state_keys = ("steps", "tables")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tables = [
            HCTable(self.num_kv_heads, self.head_dim, self.cfg.resv, layer, device=self.device)
            for layer in range(self.num_layers)
        ]

    @property
    def resv(self) -> ResvConfig:
        return self.cfg.resv

    def select(
        self, layer: int, query: Tensor, history_len: int, scaling: float, stage: str | None = None
    ) -> Selection:
        self._check(layer, query, history_len, stage)
        table = self.tables[layer]
        if table.num_tokens != history_len:
            raise ValueError(
                f"layer {layer}: table holds {table.num_tokens} tokens, history is {history_len}"
            )
        mask = self.always_mask(history_len)
        hkv, c = self.num_kv_heads, table.num_clusters
        if not history_len or not c or not query.shape[1]:
            zeros = torch.zeros(hkv, dtype=torch.int64, device=self.device)
            return Selection(mask, clusters=zeros, selected_clusters=zeros)
        query = query.to(self.device)
        hg = table.heads_per_group
        counts_i = table.counts.view  # [G, C]
        if hg > 1:
            counts_i = counts_i[:, None].expand(-1, hg, -1).reshape(hkv, c)
        counts = counts_i.to(torch.float32)  # [Hkv, C]
        valid = (counts > 0)[:, None, :]
        member = table.member_of.view  # [G, N]
        if hg > 1:
            member = member.expand(hkv, -1)
        if self.resv.mass == "retrievable":
            counts = counts - self._always_counts(member, history_len, c)
        all_valid = bool(valid.all())  # empty slots only appear when groups seed unevenly
        ratio = self.resv.ratio_for(query.shape[1], stage)
        cluster_mask = torch.zeros(hkv, c, dtype=torch.bool, device=self.device)
        fractions = []
        for part in _query_blocks(query, c):
            rows = self._weights(table, part, scaling, counts, valid, all_valid).reshape(-1, c)
            if self.resv.num_buckets:
                picked, frac = wicsum_select_bucketed(rows, ratio, self.resv.num_buckets)
                fractions.append(frac)
            else:
                picked = wicsum_select(rows, ratio)
            if self.resv.mass == "retrievable":
                picked &= rows > 0  # a cluster of always-attended tokens only adds nothing
            # union over rows and query heads (a byte max: any() over a middle dim is much slower)
            cluster_mask |= picked.view(torch.uint8).reshape(hkv, -1, c).amax(1).bool()
        exit_fraction = float(torch.cat(fractions).mean()) if fractions else None
        mask |= cluster_mask.gather(1, member)
        return Selection(
            mask,
            clusters=valid[:, 0, :].sum(1),
            selected_clusters=cluster_mask.sum(1),
            early_exit_fraction=exit_fraction,
        )

    def _weights(
        self, table: HCTable, query: Tensor, scaling: float, counts: Tensor, valid: Tensor, all_valid: bool
    ) -> Tensor:
        """Count-weighted cluster scores ``[Hkv, R, C]`` of the query rows, WiCSum's input."""
        scores = cluster_scores(table, query, scaling)
        if self.resv.weight_form == "linear":
            weights = scores.clamp_min(0) * counts[:, None, :]
            return weights if all_valid else weights.masked_fill(~valid, 0.0)
        # in place: these [Hkv, R, C] passes are most of the selection's time. Empty slots
        # score -inf, so exp gives them weight 0; on a CPU only the rows that need it are
        # masked (a GPU masks all in one launch rather than wait on a count)
        few_rows = scores.device.type == "cpu" and self.resv.estimator != "bound"
        if not all_valid and not few_rows:
            scores.masked_fill_(~valid, -torch.inf)
        rowmax = scores.amax(-1, keepdim=True)
        if not all_valid and few_rows:
            _mask_rows_led_by_empty_slots(scores, rowmax, valid)
        return scores.sub_(rowmax).clamp_min_(EXP_FLOOR).exp_().mul_(counts[:, None, :])

    def _always_counts(self, member: Tensor, history_len: int, num_clusters: int) -> Tensor:
        """Always-attended members per cluster ``[Hkv, C]``: only sinks and window are read."""
        sink = min(self.cfg.sink_tokens, history_len)
        start = max(sink, history_len - self.cfg.recent_tokens)
        idx = torch.cat([member[:, :sink], member[:, start:]], 1)
        out = torch.zeros(member.shape[0], num_clusters, device=self.device)
        return out.scatter_add_(1, idx, torch.ones(idx.shape, device=self.device))

    def observe(self, layer: int, keys: Tensor) -> Tensor:
        self._check(layer)
        ids = self.tables[layer].add(keys.to(self.device)).cluster_ids  # checks the keys first
        self.steps[layer] += 1
        return ids

    def on_evicted(self, layer: int, kv_head: int, page_ids: Tensor) -> None:
        table = self.tables[layer]
        group = kv_head // table.heads_per_group
        table.close(group, page_ids.to(self.device))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "tables": [t.state_dict() for t in self.tables]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for table, s in zip(self.tables, state["tables"], strict=True):
            table.load_state_dict(s)


# On a CPU the query tokens are scored in blocks of about this many bytes of [Hkv, R, C]
# weights: each pass over a block then reuses memory still in cache instead of faulting in a
# fresh frame-sized array (1.2x on a frame's selection of 10-30K clusters).
CPU_BLOCK_BYTES = 16 << 20


def _query_blocks(query: Tensor, num_clusters: int) -> list[Tensor]:
    """The step's queries ``[Hq, Tq, d]`` split along Tq for scoring (one block on a GPU)."""
    hq, tq, _ = query.shape
    if query.device.type != "cpu":
        return [query]
    fits = CPU_BLOCK_BYTES // (hq * num_clusters * 4)
    block = max(fits, -(-CANDIDATE_MIN_ROWS // hq), 1)  # rows enough for WiCSum's candidate path
    return list(query.tensor_split(max(tq // block, 1), dim=1))  # near-equal, none under block


def _mask_rows_led_by_empty_slots(scores: Tensor, rowmax: Tensor, valid: Tensor) -> None:
    """Empty slots (zero sums) score exactly 0 under the mean and radius estimators, and
    their count of 0 zeroes their weight, so a row's max over all slots is its max over real
    clusters wherever that is >= 0. Only rows whose max is <= 0 get their empty slots set
    to -inf and their max retaken: the rest skip a masked pass over the whole score tensor
    (14% of a frame's selection on the model's own keys)."""
    low = (rowmax[..., 0] <= 0).nonzero(as_tuple=True)  # [Hkv, R] -> (heads, rows)
    if not low[0].numel():
        return
    fixed = scores[low].masked_fill_(~valid[low[0], 0], -torch.inf)
    scores[low] = fixed
    rowmax[low] = fixed.amax(-1, keepdim=True)


_CLASSES = {cls.name: cls for cls in (FullSelector, WindowSelector, TopKSelector, RekvSelector, ResvSelector)}


def selector_class(policy: str) -> type[Selector]:
    """The selector class of a policy name (see ``POLICIES``)."""
    if policy not in _CLASSES:
        raise ValueError(f"policy must be one of {', '.join(_CLASSES)}, got {policy!r}")
    return _CLASSES[policy]


def make_selector(
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    config: SelectorConfig | ResvConfig | str | None = "resv",
    device: torch.device | str = "cpu",
) -> Selector:
    """A selector by policy name (``full``, ``window``, ``topk``, ``rekv``, ``resv``: ReSV with
    the ``default`` preset), a :class:`ResvConfig` (ReSV with it, e.g. ``vrex.resv.PAPER``) or
    a :class:`SelectorConfig` (sinks, window, budgets as well)."""
    if config is None:
        config = SelectorConfig()
    elif isinstance(config, str):
        config = SelectorConfig(policy=config)
    elif isinstance(config, ResvConfig):
        config = SelectorConfig(policy="resv", resv=config)
    elif not isinstance(config, SelectorConfig):
        raise ValueError(f"config must be a policy name, a ResvConfig or a SelectorConfig, got {config!r}")
    return _CLASSES[config.policy](num_layers, num_heads, num_kv_heads, head_dim, config, device)
