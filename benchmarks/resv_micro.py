"""ReSV micro-benchmark on structured synthetic streams (one decoder layer).

Consecutive frames are noisy near-copies of a scene (keys share a common offset, as real
keys do) with occasional scene cuts. A few planted outlier tokens ("needles") are each
targeted by one query head of the measured step. Per selector: fetched fraction, needle
recall, attention-output error against full attention, selection time and the time of
attention over the selected set; for ReSV also tokens per cluster and the HC overhead.
Rows for ``topk`` and ``rekv`` are run at ReSV's fetched fraction (``matched_to``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import Tensor

import vrex.resv as resv
from benchmarks.common import emit
from vrex.host import check_output_path, machine_info


@dataclass(frozen=True)
class Shape:
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tokens_per_frame: int


SHAPES = {
    "llama3-8b": Shape("llama3-8b", 32, 8, 128, 10),  # VideoLLM-online: 10 tokens per frame
    "smollm2": Shape("smollm2", 9, 3, 64, 64),
}

RESV_VARIANTS = {
    "resv-paper": resv.PAPER,
    "resv-mean": resv.DEFAULT,
    "resv-bound": resv.DEFAULT.replace(estimator="bound"),
    "resv-radius": resv.DEFAULT.replace(estimator="radius"),
}


@dataclass
class Stream:
    keys: Tensor  # [Hkv, N, d]
    values: Tensor
    frames: list[tuple[int, int]]
    query: Tensor  # [Hq, Tq, d]
    q_keys: Tensor  # the step's own keys [Hkv, Tq, d]
    q_values: Tensor
    needles: list[tuple[int, int]]  # (kv head, position)


NEEDLE_LO = 8  # needles stay out of the first tokens (the sinks)


def min_history(shape: Shape) -> int:
    """Shortest history `make_stream` can plant needles in: past the sinks and before the
    recent window of two frames."""
    return NEEDLE_LO + 2 * shape.tokens_per_frame + 1


def make_stream(shape: Shape, history: int, rows: int, needles: int, seed: int = 0) -> Stream:
    gen = torch.Generator().manual_seed(seed)
    hkv, d, tpf = shape.num_kv_heads, shape.head_dim, shape.tokens_per_frame
    offset = torch.randn(hkv, 1, d, generator=gen)  # shared component of all keys
    frames, chunks = [], []
    pos = 0
    scene = torch.randn(hkv, tpf, d, generator=gen)
    while pos < history:
        n = min(tpf, history - pos)
        if torch.rand(1, generator=gen).item() < 0.05:
            scene = torch.randn(hkv, tpf, d, generator=gen)
        chunks.append(offset + scene[:, :n] + 0.15 * torch.randn(hkv, n, d, generator=gen))
        frames.append((pos, n))
        pos += n
    keys = torch.cat(chunks, 1)
    values = torch.randn(hkv, history, d, generator=gen)
    group = shape.num_heads // hkv
    # ordinary rows look for one earlier token's scene content (its near-copies across frames)
    targets = torch.randint(0, history, (shape.num_heads, rows), generator=gen)
    kv_of_head = torch.arange(hkv).repeat_interleave(group)
    content = keys[kv_of_head[:, None], targets] - offset.repeat_interleave(group, 0)
    query = 0.5 * content + 0.3 * torch.randn(shape.num_heads, rows, d, generator=gen)
    planted = []
    lo = NEEDLE_LO
    hi = history - 2 * tpf  # and out of the recent window
    for i in range(needles):
        h = i % hkv
        p = int(torch.randint(lo, hi, (1,), generator=gen))
        direction = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
        keys[h, p] = offset[h, 0] + 4.0 * direction * d**0.5 / 2
        query[h * group + i // hkv % group, :] = 1.5 * direction * d**0.5 / 2
        planted.append((h, p))
    q_keys = offset + torch.randn(hkv, rows, d, generator=gen)
    q_values = torch.randn(hkv, rows, d, generator=gen)
    return Stream(keys, values, frames, query, q_keys, q_values, planted)


def attention(query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, q_keys, q_values) -> Tensor:
    """Attention of the step's rows over (history where ``mask``) + the step's own tokens.

    query [Hq, R, d]; keys/values [Hkv, N, d] (already gathered or full); mask [Hkv, N] or None.
    """
    hq, r, d = query.shape
    hkv = keys.shape[0]
    k = torch.cat([keys, q_keys], 1).repeat_interleave(hq // hkv, 0)
    v = torch.cat([values, q_values], 1).repeat_interleave(hq // hkv, 0)
    n_hist = keys.shape[1]
    hist = torch.ones(hkv, 1, n_hist, dtype=torch.bool) if mask is None else mask[:, None, :]
    causal = torch.ones(r, r, dtype=torch.bool).tril()
    allowed = torch.cat([hist.expand(hkv, r, n_hist), causal.expand(hkv, r, r)], -1)
    allowed = allowed.repeat_interleave(hq // hkv, 0)
    return torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=allowed)


def gathered_attention(query: Tensor, stream: Stream, sel: resv.Selection) -> tuple[Tensor, float]:
    """Attention over the selected tokens only (gather, pad, attend), timed."""
    t0 = time.perf_counter()
    positions = sel.positions()
    width = max(int(p.numel()) for p in positions)
    hkv, _, d = stream.keys.shape
    idx = torch.zeros(hkv, width, dtype=torch.int64)
    valid = torch.zeros(hkv, width, dtype=torch.bool)
    for h, p in enumerate(positions):
        idx[h, : p.numel()] = p
        valid[h, : p.numel()] = True
    k = stream.keys.gather(1, idx[..., None].expand(-1, -1, d))
    v = stream.values.gather(1, idx[..., None].expand(-1, -1, d))
    out = attention(query, k, v, valid, stream.q_keys, stream.q_values)
    return out, (time.perf_counter() - t0) * 1e3


def feed(selector: resv.Selector, stream: Stream) -> float:
    t0 = time.perf_counter()
    for start, n in stream.frames:
        selector.observe(0, stream.keys[:, start : start + n])
    return (time.perf_counter() - t0) * 1e3


def timed(fn, repeats: int) -> tuple[object, float]:
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return out, best


def measure(shape: Shape, history: int, rows: int, needles: int, repeats: int, seed: int) -> list[dict]:
    stream = make_stream(shape, history, rows, needles, seed)
    scaling = shape.head_dim**-0.5
    q = stream.query
    full_out, full_ms = timed(
        lambda: attention(q, stream.keys, stream.values, None, stream.q_keys, stream.q_values), repeats
    )
    dims = (1, shape.num_heads, shape.num_kv_heads, shape.head_dim)
    base = {"shape": shape.name, "history_tokens": history, "query_rows": rows, "full_attention_ms": full_ms}
    rows_out = [
        {
            **base,
            "policy": "full",
            "fetched_fraction": 1.0,
            "needle_recall": 1.0,
            "output_rel_error": 0.0,
            "select_ms": 0.0,
            "attention_ms": full_ms,
        }
    ]

    def run(name: str, cfg: resv.SelectorConfig, extra: dict) -> dict:
        selector = resv.make_selector(*dims, cfg)
        observe_ms = feed(selector, stream)
        sel, select_ms = timed(lambda: selector.select(0, q, history, scaling), repeats)
        out, attn_ms = gathered_attention(q, stream, sel)
        # mean over (head, row) so no single peaky head dominates the figure
        err = float(((out - full_out).norm(dim=-1) / full_out.norm(dim=-1)).mean())
        recall = sum(bool(sel.token_mask[h, p]) for h, p in stream.needles) / max(1, len(stream.needles))
        row = {
            **base,
            "policy": name,
            "fetched_fraction": sel.fetched_fraction(),
            "needle_recall": recall,
            "output_rel_error": err,
            "select_ms": select_ms,
            "attention_ms": attn_ms,
            "select_vs_full_attention": select_ms / full_ms,
            "observe_ms_per_frame": observe_ms / len(stream.frames),
            **extra,
        }
        if isinstance(selector, resv.ResvSelector):
            table = selector.tables[0]
            row["tokens_per_cluster"] = (
                table.num_tokens * table.groups / max(1, int((table.counts.view > 0).sum()))
            )
            row["hc_overhead_fraction"] = table.overhead_fraction(kv_dtype_bytes=2)
        return row

    common = {"sink_tokens": 4, "recent_tokens": shape.tokens_per_frame}
    for name, rcfg in RESV_VARIANTS.items():
        row = run(name, resv.SelectorConfig(policy="resv", resv=rcfg, **common), {})
        rows_out.append(row)
        budget = max(1e-3, min(1.0, row["fetched_fraction"]))
        for base_policy in ("rekv", "topk"):
            cfg = resv.SelectorConfig(policy=base_policy, budget_fraction=budget, **common)
            rows_out.append(run(base_policy, cfg, {"matched_to": name}))
    rows_out.append(run("window", resv.SelectorConfig(policy="window", **common), {}))
    return rows_out


def run_benchmark(
    quick: bool = False, shapes: list[str] | None = None, histories: list[int] | None = None, seed: int = 0
) -> list[dict]:
    shapes = shapes or list(SHAPES)
    histories = histories or ([1000, 5000] if quick else [1000, 5000, 10000, 20000, 40000])
    out = []
    for name in shapes:
        shape = SHAPES[name]
        for history in histories:
            out += measure(
                shape, history, rows=shape.tokens_per_frame, needles=8, repeats=2 if quick else 3, seed=seed
            )
    return out


COLUMNS = [
    "shape",
    "history_tokens",
    "policy",
    "matched_to",
    "fetched_fraction",
    "needle_recall",
    "output_rel_error",
    "select_ms",
    "attention_ms",
    "select_vs_full_attention",
    "tokens_per_cluster",
    "hc_overhead_fraction",
]


def _check_args(args: argparse.Namespace) -> None:
    """Checked before the run: results are only written once every point is measured."""
    widest = max((SHAPES[name] for name in args.shape or SHAPES), key=min_history)
    least = min_history(widest)
    for h in args.history or ():
        if h < least:
            raise ValueError(
                f"--history must be >= {least} tokens for shape {widest.name} (needles sit between "
                f"the first {NEEDLE_LO} tokens and the last two frames), got {h}"
            )
    check_output_path(args.out, "--out")


def _main(args: argparse.Namespace) -> int:
    _check_args(args)
    rows = run_benchmark(args.quick, args.shape, args.history, args.seed)
    if rows:
        rows[0]["machine"] = machine_info()
    if not args.json:
        print(f"# machine: {machine_info()}")
    emit(rows, COLUMNS, args.json, args.out)
    return 0
