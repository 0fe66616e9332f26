"""`vrex bench fidelity`: ReSV and the baseline selectors against full attention, on real weights.

Four parts, all through real streaming sessions of one model (the demo model by default:
SmolLM2-135M-Instruct text weights; its vision tower is random, so video fidelity is measured
against the same model's full-attention output, not against human answers):

1. ``needle``  — a filler stream (Python stdlib docstrings) prefilled chunk by chunk as frame
   steps, one pass key at a random depth, then the question. Exact match of the key in a greedy
   answer, per selector. Only trials where full attention finds the key count.
2. ``video``   — sample videos at 1-2 fps, questions at several times. Per selector: the answer
   teacher-forced on the full-attention answer (token agreement, mean KL of the next-token
   distributions), per-layer attention-output relative error, fetched fraction per stage,
   layer and KV head.
3. ``budget``  — each selector's knob swept (ReSV ratio, top-k / ReKV budget, window size):
   fidelity against fetched fraction, as a table and a PNG.
4. ``default`` — ReSV settings swept (scope, Hamming threshold, floor, cap, estimator, frame
   and decode ratio); the rule of issue 4 picks the shipped default.

Every row names its ``policy`` (the variant) and carries figures with units in the key names.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

import vrex.resv as resv
from benchmarks.cli import FIDELITY_PARTS as PARTS
from benchmarks.common import emit
from vrex.engine import Engine, EngineConfig, SessionSettings
from vrex.engine.session import Session
from vrex.host import check_output_path, dumps, machine_info
from vrex.limits import check_fps, check_max_new_tokens
from vrex.resv import ResvConfig

QUESTION = "What is the secret pass key? Answer with the number."
# The start of the answer, fed after the question: without it the 135M model mostly talks
# about the filler and full attention itself finds no key (0 of 9 trials at 2K vs 5 of 9).
ANSWER_PRIMER = "The secret pass key is"
NEEDLE = "The secret pass key is {key}. Remember it: the pass key is {key}. "
DEPTH_BINS = ((0.1, 0.37), (0.37, 0.63), (0.63, 0.9))
# the stages whose logits are scored (question prefill and answer tokens): fidelity is judged
# against what these fetch, not the frame steps (docs/research-resv-equal-budget.md)
ANSWER_STAGES = ("text", "decode")
RAW_LOG = None  # --raw FILE: every trial as a JSON line as soon as it ends (long runs)
VIDEO_QUESTIONS = ("What is happening in the video?", "Describe what you saw so far.")
# The needle is ~25 tokens; the filler around it needs room for three depth bins.
MIN_NEEDLE_HISTORY = 128


# ------------------------------------------------------------------------------------------
# Variants: a name, a policy and the selector settings


@dataclass(frozen=True)
class Variant:
    name: str
    policy: str
    resv: ResvConfig = resv.DEFAULT
    budget_fraction: float = 0.1
    recent_tokens: int | None = None  # None: the session default (one frame)
    knob: str = ""  # what the budget sweep varied, for the table and plot

    def settings(self) -> SessionSettings:
        return SessionSettings(
            policy=self.policy,
            max_new_tokens=32,
            resv_config=self.resv,
            budget_fraction=self.budget_fraction,
            recent_tokens=self.recent_tokens,
        )


def baseline_variants() -> list[Variant]:
    """Full attention first (the reference), then ReSV default and paper presets and baselines."""
    return [
        Variant("full", "full"),
        Variant("resv", "resv", resv.DEFAULT),
        Variant("resv-paper", "resv", resv.PAPER),
        Variant("topk", "topk", budget_fraction=0.1),
        Variant("rekv", "rekv", budget_fraction=0.1),
        Variant("window", "window"),
    ]


def needle_variants() -> list[Variant]:
    """The baselines plus ReKV-like at larger budgets (the bytes it needs to find the key at
    all are what ReSV's byte saving is measured against) and ReSV with the question cut at the
    frame ratio (the default before ``text_ratio``)."""
    return (
        baseline_variants()
        + [Variant(f"rekv-b{b:g}", "rekv", budget_fraction=b, knob=f"budget={b:g}") for b in (0.25, 0.5)]
        + [
            Variant(
                "resv-rows", "resv", resv.DEFAULT.replace(text_ratio=None), knob="question at frame ratio"
            )
        ]
    )


def pick_variants(variants: list[Variant], names: list[str] | None) -> list[Variant]:
    """Only the named variants, with full attention (the reference) always first. A name no
    part knows raises before anything runs; one only the other part knows is skipped here."""
    if not names:
        return variants
    known = {v.name for v in needle_variants() + baseline_variants()}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return [v for v in variants if v.policy == "full" or v.name in names]


def needle_from_raw(paths: list[str]) -> list[dict]:
    """Needle rows (and targets) from ``--raw`` files of earlier runs, merged: trials are
    told apart by (seed, trial), so runs with different seeds add up."""
    raw = []
    for path in paths:
        with open(path) as f:
            raw += [json.loads(line) for line in f if line.strip()]
    rows = summarize_needle(raw, list(dict.fromkeys(r["policy"] for r in raw)))
    return rows + needle_targets(rows)


def needle_targets(rows: list[dict]) -> list[dict]:
    """Per history: ReSV's bytes against the cheapest ReKV-like budget that matches full
    attention's accuracy (the paper reports 3.0x fewer), and ReSV's own accuracy verdict."""
    out = []
    for history in sorted({r["history_tokens"] for r in rows if r.get("part") == "needle"}):
        at = {r["policy"]: r for r in rows if r.get("part") == "needle" and r["history_tokens"] == history}
        resv_row = at.get("resv")
        if resv_row is None or not resv_row.get("trials_full_found"):
            continue
        exact = [r for p, r in at.items() if p.startswith("rekv") and r["accuracy"] == 1.0]
        cheapest = min(exact, key=lambda r: r["bytes_fetched"], default=None)
        row = {
            "part": "needle-target",
            "policy": "resv",
            "history_tokens": history,
            "accuracy": resv_row["accuracy"],
            "equal_to_full": resv_row["accuracy"] == 1.0,
            "rekv_policy_at_equal_accuracy": cheapest["policy"] if cheapest else None,
            "bytes_ratio_rekv_over_resv": (
                cheapest["bytes_fetched"] / resv_row["bytes_fetched"] if cheapest else None
            ),
        }
        row["met"] = bool(row["equal_to_full"] and (row["bytes_ratio_rekv_over_resv"] or 0) >= 3.0)
        out.append(row)
    return out


def budget_variants(quick: bool) -> list[Variant]:
    """Each selector's knob swept so the fetched fractions line up. ReSV's frame and decode
    ratios act on different stages, so its points are (frame, decode) pairs."""
    pairs = (
        ((0.5, 0.9), (0.7, 0.97))
        if quick
        else ((0.3, 0.9), (0.5, 0.95), (0.7, 0.97), (0.7, 0.99), (0.9, 0.995))
    )
    ratios = (0.3, 0.7) if quick else (0.1, 0.3, 0.5, 0.7, 0.9, 0.97)
    fractions = (0.05, 0.2, 0.4) if quick else (0.03, 0.06, 0.1, 0.2, 0.3, 0.45)
    windows = (128, 512) if quick else (128, 256, 512, 1024)
    out = [Variant("full", "full")]
    for f, d in pairs:
        cfg = resv.DEFAULT.replace(frame_ratio=f, decode_ratio=d)
        out.append(Variant(f"resv-f{f:g}d{d:g}", "resv", cfg, knob=f"ratio={f:g}/{d:g}"))
    for r in ratios:
        cfg = resv.PAPER.replace(frame_ratio=r, decode_ratio=r)
        out.append(Variant(f"resv-paper-r{r:g}", "resv", cfg, knob=f"ratio={r:g}"))
    for f in fractions:
        out.append(Variant(f"topk-b{f:g}", "topk", budget_fraction=f, knob=f"budget={f:g}"))
        out.append(Variant(f"rekv-b{f:g}", "rekv", budget_fraction=f, knob=f"budget={f:g}"))
    for w in windows:
        out.append(Variant(f"window-w{w}", "window", recent_tokens=w, knob=f"recent={w}"))
    return out


def _ph(threshold: int, floor: float | None, frame: float, decode: float, **more) -> ResvConfig:
    return ResvConfig(
        scope="per_head",
        hamming_threshold=threshold,
        similarity_floor=floor,
        frame_ratio=frame,
        decode_ratio=decode,
        **more,
    )


def default_candidates(quick: bool) -> list[Variant]:
    """ReSV settings for the default sweep (the axes of issue 4, one or two at a time). Names:
    scope-threshold-floor-ratios[-other]."""
    grid: dict[str, ResvConfig] = {
        "paper": resv.PAPER,
        "default": resv.DEFAULT,
        "ph-t9-f0.8-r0.7/0.9": _ph(9, 0.8, 0.7, 0.9),  # the default before the decode study
        "ph-t9-f0.9-r0.7/0.97": _ph(9, 0.9, 0.7, 0.97),
        "ph-t9-f0.9-r0.5/0.97": _ph(9, 0.9, 0.5, 0.97),
        "ph-t9-f0.9-r0.5/0.95": _ph(9, 0.9, 0.5, 0.95),
        "ph-t9-f0.9-r0.3/0.97": _ph(9, 0.9, 0.3, 0.97),
        "ph-t9-f0.9-r0.7/0.9-retrievable": _ph(9, 0.9, 0.7, 0.9, mass="retrievable"),
    }
    if not quick:
        grid.update(
            {
                "ph-t9-f0.9-r0.7/0.99": _ph(9, 0.9, 0.7, 0.99),
                "ph-t7-f0.9-r0.7/0.97": _ph(7, 0.9, 0.7, 0.97),
                "ph-t11-f0.9-r0.7/0.97": _ph(11, 0.9, 0.7, 0.97),
                "ph-t9-f0.95-r0.7/0.97": _ph(9, 0.95, 0.7, 0.97),
                "ph-t9-none-r0.7/0.97": _ph(9, None, 0.7, 0.97),
                "ph-t9-f0.9-r0.7/0.97-cap16": _ph(9, 0.9, 0.7, 0.97, max_cluster_tokens=16),
                "ph-t9-f0.9-r0.7/0.97-radius": _ph(9, 0.9, 0.7, 0.97, estimator="radius"),
                "all-t9-f0.9-r0.7/0.97": _ph(9, 0.9, 0.7, 0.97).replace(scope="all_heads"),
            }
        )
    seen, out = set(), [Variant("full", "full")]
    for k, c in grid.items():  # the default may equal a grid point: run it once
        if c not in seen:
            seen.add(c)
            out.append(Variant(f"resv:{k}", "resv", c, knob=k))
    return out


def bench_session(engine: Engine, variant: Variant) -> Session:
    return Session(engine, variant.settings())


# ------------------------------------------------------------------------------------------
# Stream helpers


@dataclass
class FetchTally:
    """Selected / history token counts per stage, layer and KV head, summed over steps."""

    selected: dict = field(default_factory=lambda: defaultdict(int))
    history: dict = field(default_factory=lambda: defaultdict(int))
    bytes_fetched: int = 0

    def add(self, rec) -> None:
        for layer in rec.layers:
            for h in layer["heads"]:
                key = (rec.stage, layer["layer"], h["kv_head"])
                self.selected[key] += h["selected_tokens"]
                self.history[key] += h["history_tokens"]
        self.bytes_fetched += rec.bytes_device + rec.bytes_host + rec.bytes_disk

    def fraction(
        self, stage: str | tuple[str, ...] | None = None, layer: int | None = None, head: int | None = None
    ) -> float:
        """Selected over history tokens; ``stage`` may name several stages."""
        stages = (stage,) if isinstance(stage, str) else stage
        sel = hist = 0
        for (s, lay, h), n in self.history.items():
            if (
                (stages is None or s in stages)
                and (layer is None or lay == layer)
                and (head is None or h == head)
            ):
                hist += n
                sel += self.selected[(s, lay, h)]
        return sel / hist if hist else float("nan")

    def per_layer_head(self, stage: str) -> list[list[float]]:
        layers = sorted({lay for (s, lay, _) in self.history if s == stage})
        heads = sorted({h for (s, _, h) in self.history if s == stage})
        return [[round(self.fraction(stage, lay, h), 4) for h in heads] for lay in layers]


def _step(session: Session, step, stage: str, tally: FetchTally | None, last_only: bool = True):
    logits, rec, _ = session._step(step, stage, last_only)
    if tally is not None:
        tally.add(rec)
    return logits


class ErrorProbe:
    """Per-layer relative error of the restricted attention output against full attention over
    the same session's own history (teacher-forced on that session's queries)."""

    def __init__(self, session: Session):
        from vrex.engine.retrieval import light_attention

        self.sums = defaultdict(float)
        self.counts = defaultdict(int)
        policy = session.policy
        inner = policy.attend

        def attend(layer, query, key, value, scaling):
            n = policy.store.length(layer)
            full = None
            if n:
                hk, hv = policy.store.fetch_all(layer)
                lengths = torch.full((hk.shape[0],), n, dtype=torch.int64)
                full = light_attention(query, hk, hv, lengths, key, value, scaling)
            out = inner(layer, query, key, value, scaling)
            if full is not None:
                err = float((out.float() - full.float()).norm() / full.float().norm().clamp_min(1e-12))
                self.sums[layer] += err
                self.counts[layer] += 1
            return out

        policy.attend = attend

    def per_layer(self) -> list[float]:
        return [self.sums[k] / self.counts[k] for k in sorted(self.counts)]


def _close(session: Session) -> None:
    session.close()


# ------------------------------------------------------------------------------------------
# 1. Needle in a stream


def filler_ids(adapter, min_tokens: int) -> torch.Tensor:
    """Token ids of Python stdlib docstrings: real, offline, deterministic text."""
    import argparse as m1
    import collections as m2
    import functools as m3
    import itertools as m4
    import json as m5
    import os as m6
    import pathlib as m7
    import re as m8
    import string as m9
    import textwrap as m10

    parts = []
    for mod in (m1, m2, m3, m4, m5, m6, m7, m8, m9, m10):
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and "pass key" not in doc:
                parts.append(doc.strip())
    text = "\n\n".join(dict.fromkeys(parts))  # deduplicated, order kept
    ids = adapter.tokenize(text)
    while len(ids) < min_tokens:
        ids = torch.cat([ids, ids])
    return ids


def _ids_step(adapter, ids: torch.Tensor, kind: str):
    return adapter._ids_step(ids, kind)


def _chunks(ids: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def needle_trial(
    engine: Engine,
    variant: Variant,
    filler: torch.Tensor,
    key: str,
    depth: float,
    chunk_tokens: int,
    offset: int,
    history: int,
) -> dict:
    a = engine.adapter
    session = bench_session(engine, variant)
    try:
        needle = a.tokenize(NEEDLE.format(key=key))
        body = filler[offset : offset + history - len(needle)]
        at = int(depth * len(body))
        stream = torch.cat([body[:at], needle, body[at:]])
        tally = FetchTally()
        t0 = time.perf_counter()
        for chunk in _chunks(stream, chunk_tokens):
            _step(session, _ids_step(a, chunk, "frame"), "frame", tally)
        prefill_s = time.perf_counter() - t0
        answer, q_logits = _greedy(session, QUESTION, 12, tally, ANSWER_PRIMER)
        text = a.tokenizer.decode(answer, skip_special_tokens=True)
        found = key in text
        return {
            "found": bool(found),
            "answer": text.strip()[:80],
            "needle_position": at,
            "history_tokens": session.history_tokens,
            "fetched_fraction_frame": tally.fraction("frame"),
            "fetched_fraction_text": tally.fraction("text"),
            "fetched_fraction_decode": tally.fraction("decode"),
            "fetched_fraction_answer": tally.fraction(ANSWER_STAGES),
            "bytes_fetched": tally.bytes_fetched,
            "prefill_s": prefill_s,
        }
    finally:
        _close(session)


def _greedy(session: Session, question: str, max_new: int, tally: FetchTally | None, primer: str = ""):
    a = session.adapter
    logits = _step(session, a.question_input(question), "text", tally)
    if primer:
        logits = _step(session, _ids_step(a, a.tokenize(primer), "text"), "text", tally)
    eos = set(a.eos_token_ids)
    ids: list[int] = []
    all_logits = [logits[0, -1]]
    for _ in range(max_new):
        token = int(logits[0, -1].argmax())
        if token in eos:
            break
        ids.append(token)
        logits = _step(session, a.token_input(token), "decode", tally)
        all_logits.append(logits[0, -1])
    return ids, all_logits


def run_needle(
    engine: Engine,
    variants: list[Variant],
    trials: int,
    histories: list[int],
    chunk_tokens: int,
    seed: int,
    log,
    min_depths: int | None = None,
) -> tuple[list[dict], list[dict]]:
    """Per variant and history: accuracy over trials where full attention found the key.

    With ``min_depths`` (the default sweep) a variant stops running at a history once it has
    missed the key in so many depth bins that it can no longer match full attention in
    ``min_depths`` of them: its verdict is settled and the sweep saves those trials."""
    filler = filler_ids(engine.adapter, max(histories) * 2 + 64)
    rng = random.Random(seed)
    raw: list[dict] = []
    missed_bins: dict[tuple[str, int], set[int]] = defaultdict(set)
    for history in histories:
        for t in range(trials):
            lo, hi = DEPTH_BINS[t % len(DEPTH_BINS)]
            depth = rng.uniform(lo, hi)
            key = str(rng.randint(10000, 99999))
            offset = rng.randint(0, len(filler) - history - 1)
            full_found = None
            for v in variants:
                if v.policy != "full" and not full_found:
                    continue  # only trials where full attention finds the key count
                if min_depths and len(missed_bins[v.name, history]) > len(DEPTH_BINS) - min_depths:
                    continue
                r = needle_trial(engine, v, filler, key, depth, chunk_tokens, offset, history)
                r.update(
                    policy=v.name,
                    seed=seed,
                    trial=t,
                    depth=round(depth, 3),
                    depth_bin=t % len(DEPTH_BINS),
                    history=history,
                )
                raw.append(r)
                if RAW_LOG is not None:
                    RAW_LOG.write(dumps(r) + "\n")
                    RAW_LOG.flush()
                if v.policy == "full":
                    full_found = r["found"]
                elif not r["found"]:
                    missed_bins[v.name, history].add(t % len(DEPTH_BINS))
                log(
                    f"needle H={history} trial {t} depth {depth:.2f} {v.name}: found={r['found']} "
                    f"frame={r['fetched_fraction_frame']:.3f} dec={r['fetched_fraction_decode']:.3f} ({r['prefill_s']:.0f}s)"
                )
    return summarize_needle(raw, [v.name for v in variants]), raw


def _trial_id(r: dict) -> tuple[int, int]:
    """Trials of runs with different seeds are different trials (merged raw files)."""
    return r.get("seed", 0), r["trial"]


def summarize_needle(raw: list[dict], names: list[str]) -> list[dict]:
    """Rows per variant name (in this order) and history, from the trials of ``raw``."""
    rows = []
    histories = sorted({r["history"] for r in raw})
    for name in names:
        for history in histories:
            mine = [r for r in raw if r["policy"] == name and r["history"] == history]
            full = [r for r in raw if r["policy"] == "full" and r["history"] == history]
            valid = {_trial_id(r) for r in full if r["found"]}
            counted = [r for r in mine if _trial_id(r) in valid]
            row = {
                "part": "needle",
                "policy": name,
                "history_tokens": history,
                "trials": len(full),
                "trials_full_found": len(valid),
                "accuracy": _mean([float(r["found"]) for r in counted]),
            }
            for b in range(len(DEPTH_BINS)):
                bin_rows = [r for r in counted if r["depth_bin"] == b]
                row[f"accuracy_depth{b}"] = _mean([float(r["found"]) for r in bin_rows])
                row[f"counted_depth{b}"] = len(bin_rows)
            for k in (
                "fetched_fraction_frame",
                "fetched_fraction_text",
                "fetched_fraction_decode",
                "fetched_fraction_answer",
                "bytes_fetched",
            ):
                row[k] = _mean([r[k] for r in counted])
            rows.append(row)
    return rows


def _mean(xs: list[float | None]) -> float:
    xs = [x for x in xs if x is not None and x == x]  # raw files hold null for NaN
    return sum(xs) / len(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------
# 2. Video streams, teacher-forced on the full-attention answer


def video_steps(engine: Engine, name: str, fps: float, max_frames: int | None) -> list:
    from vrex.video import FileSource, resolve_video

    steps = []
    for _, image in FileSource(resolve_video(name), fps=fps):
        steps.append(engine.adapter.frame_embeds(image))
        if max_frames and len(steps) >= max_frames:
            break
    return steps


def ask_points(num_frames: int, num_questions: int) -> list[int]:
    """Frame counts after which a question is asked: evenly spread, the last at the end."""
    return sorted({max(1, round(num_frames * (i + 1) / num_questions)) for i in range(num_questions)})


def run_video_stream(
    engine: Engine,
    variant: Variant,
    frames: list,
    asks: list[int],
    reference: list | None,
    answer_tokens: int,
    probe: bool,
) -> dict:
    """One stream. For ``reference=None`` (full attention) the greedy answers are made and their
    logits returned; otherwise the reference answers are teacher-forced and compared."""
    a = engine.adapter
    session = bench_session(engine, variant)
    err_probe = ErrorProbe(session) if probe and variant.policy != "full" else None
    tally = FetchTally()
    answers, agree, kls, n_tok = [], 0, [], 0
    try:
        q = 0
        for i, step in enumerate(frames, start=1):
            _step(session, step, "frame", tally)
            if q < len(asks) and i == asks[q]:
                question = VIDEO_QUESTIONS[q % len(VIDEO_QUESTIONS)]
                if reference is None:
                    ids, logits = _greedy(session, question, answer_tokens, tally)
                    answers.append((ids, [lg.log_softmax(-1) for lg in logits[: len(ids)]]))
                else:
                    ref_ids, ref_logp = reference[q]
                    logits = _step(session, a.question_input(question), "text", tally)
                    for j, tok in enumerate(ref_ids):
                        logp = logits[0, -1].log_softmax(-1)
                        agree += int(int(logp.argmax()) == tok)
                        kls.append(float((ref_logp[j].exp() * (ref_logp[j] - logp)).sum()))
                        n_tok += 1
                        if j + 1 < len(ref_ids):
                            logits = _step(session, a.token_input(tok), "decode", tally)
                _step(session, a.next_turn_input(), "text", tally)
                q += 1
        out = {
            "answers": answers,
            "agreement": agree / n_tok if n_tok else float("nan"),
            "kl": _mean(kls),
            "answer_tokens": n_tok,
            "tally": tally,
            "history_tokens": session.history_tokens,
            "layer_error": err_probe.per_layer() if err_probe else [],
        }
        return out
    finally:
        _close(session)


def run_video(
    engine: Engine,
    variants: list[Variant],
    videos: list[tuple[str, float, int | None]],
    num_questions: int,
    answer_tokens: int,
    probe: bool,
    log,
    part: str = "video",
) -> list[dict]:
    rows = []
    per_variant = defaultdict(list)
    for name, fps, max_frames in videos:
        frames = video_steps(engine, name, fps, max_frames)
        asks = ask_points(len(frames), num_questions)
        ref = None
        for v in variants:
            t0 = time.perf_counter()
            if v.policy == "full":
                res = run_video_stream(engine, v, frames, asks, None, answer_tokens, False)
                ref = res["answers"]
                res.update(agreement=1.0, kl=0.0, answer_tokens=sum(len(i) for i, _ in ref))
            else:
                res = run_video_stream(engine, v, frames, asks, ref, answer_tokens, probe)
            res["video"] = name
            per_variant[v.name].append(res)
            log(
                f"{part} {name} {v.name}: agree={res['agreement']:.3f} kl={res['kl']:.4f} "
                f"frame={res['tally'].fraction('frame'):.3f} ({time.perf_counter() - t0:.0f}s)"
            )
            rows.append(_video_row(part, v, [res], name, fps, len(frames), asks))
    for v in variants:
        rows.append(_video_row(part, v, per_variant[v.name], "all", None, None, None))
    return rows


def _video_row(part, v, results, video, fps, frames, asks) -> dict:
    n = sum(r["answer_tokens"] for r in results)
    agree = sum(r["agreement"] * r["answer_tokens"] for r in results) / n if n else float("nan")
    kl = sum(r["kl"] * r["answer_tokens"] for r in results) / n if n else float("nan")
    tally = FetchTally()
    for r in results:
        for k, val in r["tally"].selected.items():
            tally.selected[k] += val
        for k, val in r["tally"].history.items():
            tally.history[k] += val
        tally.bytes_fetched += r["tally"].bytes_fetched
    layer_err = [r["layer_error"] for r in results if r["layer_error"]]
    per_layer_err = [sum(col) / len(col) for col in zip(*layer_err, strict=True)] if layer_err else []
    row = {
        "part": part,
        "policy": v.name,
        "knob": v.knob,
        "video": video,
        "fps": fps,
        "frames": frames,
        "ask_after_frames": asks,
        "history_tokens": max(r["history_tokens"] for r in results) if results else 0,
        "answer_tokens": n,
        "agreement": agree,
        "kl_mean_nats": kl,
        "fetched_fraction_frame": tally.fraction("frame"),
        "fetched_fraction_text": tally.fraction("text"),
        "fetched_fraction_decode": tally.fraction("decode"),
        "fetched_fraction_answer": tally.fraction(ANSWER_STAGES),
        "bytes_fetched": tally.bytes_fetched,
        "attn_rel_error_mean": _mean(per_layer_err) if per_layer_err else None,
        "attn_rel_error_worst_layer": max(per_layer_err) if per_layer_err else None,
    }
    if video == "all":
        row["fetched_fraction_frame_per_layer_head"] = tally.per_layer_head("frame")
        row["fetched_fraction_decode_per_layer_head"] = tally.per_layer_head("decode")
        row["attn_rel_error_per_layer"] = [round(x, 4) for x in per_layer_err]
    return row


# ------------------------------------------------------------------------------------------
# 4. The rule that picks the shipped default


def choose_default(
    needle_rows: list[dict], video_rows: list[dict], min_depths: int = 2
) -> tuple[str | None, list[dict]]:
    """Fewest fetched bytes among ReSV settings with needle accuracy equal to full attention at
    ``min_depths`` or more depth bins (bins where full attention found the key in some trial)
    and answer agreement >= 99% on the video streams."""
    verdicts = []
    full = {r["history_tokens"]: r for r in needle_rows if r["policy"] == "full"}
    for r in needle_rows:
        if not r["policy"].startswith("resv"):
            continue
        f = full.get(r["history_tokens"])
        depths_ok = 0
        for b in range(len(DEPTH_BINS)):
            if r.get(f"counted_depth{b}", 0) and r[f"accuracy_depth{b}"] == 1.0:
                depths_ok += 1
        video = next((v for v in video_rows if v["policy"] == r["policy"] and v["video"] == "all"), None)
        agreement = video["agreement"] if video else float("nan")
        ok = depths_ok >= min_depths and agreement >= 0.99 and f is not None
        verdicts.append(
            {
                "part": "default",
                "policy": r["policy"],
                "history_tokens": r["history_tokens"],
                "needle_accuracy": r["accuracy"],
                "depths_equal_to_full": depths_ok,
                "agreement": agreement,
                "kl_mean_nats": video["kl_mean_nats"] if video else None,
                "fetched_fraction_frame": r["fetched_fraction_frame"],
                "fetched_fraction_decode": r["fetched_fraction_decode"],
                "video_fetched_fraction_frame": video["fetched_fraction_frame"] if video else None,
                "video_fetched_fraction_decode": video["fetched_fraction_decode"] if video else None,
                "bytes_fetched": r["bytes_fetched"] + (video["bytes_fetched"] if video else 0),
                "passes_rule": ok,
            }
        )
    passing = [v for v in verdicts if v["passes_rule"]]
    winner = min(passing, key=lambda v: v["bytes_fetched"])["policy"] if passing else None
    for v in verdicts:
        v["winner"] = v["policy"] == winner
    return winner, verdicts


# ------------------------------------------------------------------------------------------
# Plot


def plot_budget(rows: list[dict], path: str) -> str:
    """KL and agreement against the fetched fraction of the scored steps (question and answer),
    and KL against the frame-step fraction (the stage the paper reports)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    families = defaultdict(list)
    for r in rows:
        if r["video"] != "all" or r["policy"] == "full":
            continue
        fam = r["policy"].rsplit("-", 1)[0] if "-" in r["policy"] else r["policy"]
        families[fam].append(r)
    for fam, rs in sorted(families.items()):
        rs = sorted(rs, key=lambda r: r["fetched_fraction_answer"])
        x = [r["fetched_fraction_answer"] for r in rs]
        axes[0].plot(x, [max(r["kl_mean_nats"], 1e-6) for r in rs], "o-", label=fam)
        axes[1].plot(x, [r["agreement"] for r in rs], "o-", label=fam)
        rs = sorted(rs, key=lambda r: r.get("fetched_fraction_frame", 0.0))
        xf = [r.get("fetched_fraction_frame", 0.0) for r in rs]
        axes[2].plot(xf, [max(r["kl_mean_nats"], 1e-6) for r in rs], "o-", label=fam)
    for ax in (axes[0], axes[2]):
        ax.set_yscale("log")
        ax.set_ylabel("mean KL vs full attention (nats)")
    axes[1].set_ylabel("answer-token agreement (teacher-forced)")
    for ax in axes[:2]:
        ax.set_xlabel("fetched fraction, question + answer steps")
    axes[2].set_xlabel("fetched fraction, frame steps")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("Fidelity vs fetched fraction (demo model, video stream; KL scored on answer tokens)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_fetch_heatmap(rows: list[dict], path: str) -> str | None:
    """Fetched fraction per layer and KV head, frame and decode stage (the paper's Fig. 20 view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = [r for r in rows if r["video"] == "all" and r["policy"] not in ("full", "window")]
    picked = [r for r in picked if r.get("fetched_fraction_frame_per_layer_head")]
    if not picked:
        return None
    fig, axes = plt.subplots(2, len(picked), figsize=(2.2 * len(picked) + 1, 7), squeeze=False)
    for j, r in enumerate(picked):
        for i, stage in enumerate(("frame", "decode")):
            grid = r.get(f"fetched_fraction_{stage}_per_layer_head") or [[0.0]]
            im = axes[i][j].imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
            axes[i][j].set_title(f"{r['policy']} {stage}", fontsize=8)
            axes[i][j].set_xlabel("KV head")
            axes[i][j].set_ylabel("layer")
    fig.subplots_adjust(hspace=0.35, wspace=0.5, right=0.8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="fetched fraction of history")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------
# CLI


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, engine: Engine | None = None) -> list[dict]:
    quick = args.quick
    torch.manual_seed(args.seed)
    if engine is None:
        engine = Engine(EngineConfig(model_dir=args.model))
    parts = args.part or list(PARTS)
    trials = args.trials if args.trials is not None else (6 if quick else 50)
    histories = args.history or ([2048] if quick else [2048, 4096, 8192])
    videos = [("bikes.mp4", 1.0, args.max_frames or (6 if quick else None))]
    if not quick:
        videos += [("bigbuckbunny.mp4", 2.0, args.max_frames), ("vtest.avi", 1.0, args.max_frames)]
    if args.video:
        videos = [(v, args.fps, args.max_frames) for v in args.video]
    rows: list[dict] = []
    needle_rows: list[dict] = []
    video_rows: list[dict] = []
    if "needle" in parts:
        needle_rows, _ = run_needle(
            engine,
            pick_variants(needle_variants(), args.variant),
            trials,
            histories,
            args.chunk_tokens,
            args.seed,
            _log,
        )
        rows += needle_rows + needle_targets(needle_rows)
    if "video" in parts:
        video_rows = run_video(
            engine,
            pick_variants(baseline_variants(), args.variant),
            videos,
            args.questions,
            args.answer_tokens,
            True,
            _log,
        )
        rows += video_rows
        if args.heatmap:
            plot_fetch_heatmap(video_rows, args.heatmap)
    if "budget" in parts:
        budget_rows = run_video(
            engine,
            budget_variants(quick),
            videos[:1],
            args.questions,
            args.answer_tokens,
            False,
            _log,
            "budget",
        )
        rows += budget_rows
        if args.plot:
            plot_budget(budget_rows, args.plot)
    if "default" in parts:
        cands = default_candidates(quick)
        d_trials = args.default_trials if args.default_trials is not None else (3 if quick else 9)
        d_hist = [histories[0]]
        n_rows, _ = run_needle(
            engine, cands, d_trials, d_hist, args.chunk_tokens, args.seed + 1, _log, min_depths=2
        )
        # only settings that can still pass need the video half of the rule
        alive = {v["policy"] for v in choose_default(n_rows, [])[1] if v["depths_equal_to_full"] >= 2}
        v_cands = [c for c in cands if c.policy == "full" or c.name in alive]
        v_rows = run_video(
            engine, v_cands, videos[:1], args.questions, args.answer_tokens, False, _log, "default-video"
        )
        winner, verdicts = choose_default(n_rows, v_rows)
        _log(f"default: winner {winner}")
        rows += n_rows + v_rows + verdicts
    if rows:
        rows[0]["machine"] = machine_info()
    return rows


COLUMNS = (
    "part",
    "policy",
    "video",
    "history_tokens",
    "trials_full_found",
    "accuracy",
    "agreement",
    "kl_mean_nats",
    "fetched_fraction_frame",
    "fetched_fraction_text",
    "fetched_fraction_decode",
    "fetched_fraction_answer",
    "attn_rel_error_mean",
    "passes_rule",
    "bytes_ratio_rekv_over_resv",
    "met",
)


def _check_args(args: argparse.Namespace) -> None:
    """The checks that need no model, so a typo fails in a second, not after loading it."""
    from vrex.host import check_at_least
    from vrex.video import resolve_video

    # None means "not given" (the default applies); 0 is a value, and a wrong one
    check_at_least(
        ("--trials", args.trials, 1),
        ("--default-trials", args.default_trials, 1),
        ("--max-frames", args.max_frames, 1),
        ("--threads", args.threads, 1),
        ("--chunk-tokens", args.chunk_tokens, 1),
        ("--questions", args.questions, 1),
    )
    check_max_new_tokens("--answer-tokens", args.answer_tokens)
    for h in args.history or ():
        if h < MIN_NEEDLE_HISTORY:
            raise ValueError(
                f"--history must be >= {MIN_NEEDLE_HISTORY} tokens (room for the needle), got {h}"
            )
    check_fps("--fps", args.fps)
    pick_variants([], args.variant)  # a misspelt --variant
    check_output_path(args.out, "--out")
    if args.merge_raw:
        return
    for video in args.video or ():
        resolve_video(video)
    parts = args.part or PARTS
    check_output_path(args.raw, "--raw")
    if "budget" in parts:
        check_output_path(args.plot, "--plot")
    if "video" in parts:
        check_output_path(args.heatmap, "--heatmap")


def _main(args: argparse.Namespace) -> int:
    global RAW_LOG
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.raw:
        Path(args.raw).parent.mkdir(parents=True, exist_ok=True)
        RAW_LOG = open(args.raw, "a")  # noqa: SIM115 - closed at exit
    if args.merge_raw:
        rows = needle_from_raw(args.merge_raw)
    else:
        rows = run(args)
    emit(rows, COLUMNS, args.json, args.out)
    return 0


if __name__ == "__main__":
    from benchmarks.cli import register_fidelity

    parser = argparse.ArgumentParser(prog="fidelity")
    register_fidelity(parser.add_subparsers())
    # this module's _main: the parser's handler would import the module again by its name
    sys.exit(_main(parser.parse_args(["fidelity", *sys.argv[1:]])))
