"""Workload: model + scenario (or a retrieval trace) -> steps with per-layer/per-head ReSV stats.

A step is one LLM pass: a frame (vision tower + `tokens_per_frame` tokens), a text prefill
(the question) or one decode token. For every layer and KV head it carries how many history
tokens there are, how many clusters, how many tokens the policy selects, and how many of
those must come over the link from the offload tier.

Synthetic ReSV model (used without a trace). Selected tokens per (layer, KV head):

    s(H) = min(H, ratio_stage * H_ref * (H / H_ref) ** growth_exponent * m_layer * m_head)

- ratio_stage is Table II's average (frame 32.7 %, text 2.5 %), taken to hold at the
  reference history H_ref (`resv.reference_history_tokens`, an assumption: the paper does
  not say at which history its COIN ratios were measured).
- growth_exponent < 1: WiCSum keeps clusters until 30 % of the softmax mass, and that mass
  concentrates in a few clusters, so the selected set grows slower than the history.
  A fixed 32.7 % cannot fit Fig. 13: at 40K tokens, 254 ms x 4 GB/s bounds the bytes that
  PCIe can bring per frame to ~7.8K tokens (19 %) even with perfect overlap. The default
  exponent (0.10) was fitted to Fig. 13's V-Rex8 latencies (documented calibration).
- Text steps (question, decode) use `text_growth_exponent` = 1: Table II's text ratio at
  every history. The frame exponent was fitted to frame latencies and says nothing about
  text; the text energy gains of Fig. 13 (4.3x at 1K to 18.5x at 40K) need V-Rex8's text
  fetch to grow with the history, and its TPOT (89-97 ms) needs that fetch hidden, which
  the next-layer prefetch of text steps does (timing.py).
- m_layer spreads layers over Fig. 20's 4.2-44 % range (normalised to mean 1, fixed seed);
  m_head is a mild +-20 % per-KV-head spread (mean 1).
- Selected tokens are spread uniformly over the history, so the fraction that lies beyond
  the device-resident recent window (`device_window_tokens`) is fetched. The window
  is the KVMU's hierarchical memory: with `accel.use_kvmu=false` there is none; a policy
  whose design keeps a local window on the device (ReKV) keeps it on a GPU too.
- Clusters: ceil(H / tokens_per_cluster) per layer, shared by the KV heads (one hash per
  token over all KV heads, DESIGN.md); the WTU processes `early_exit_fraction` of a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from sim.config import ModelConfig, ResvConfig, Scenario, SystemConfig

POLICY_FILE = Path(__file__).parent / "data" / "policies.yaml"


@lru_cache(maxsize=1)
def policy_table() -> dict[str, dict]:
    return yaml.safe_load(POLICY_FILE.read_text())["policies"]


@dataclass(frozen=True)
class Step:
    """One LLM pass. Arrays are [num_layers, num_kv_heads], means over the batch's streams."""

    stage: str  # frame | text | decode
    new_tokens: int  # per stream
    history_tokens: int  # per stream, before this step
    batch: int
    vision: bool
    clusters: np.ndarray  # [L] clusters in the HC table per layer
    selected_tokens: np.ndarray  # [L, Hkv] tokens attended from the history
    selected_clusters: np.ndarray  # [L, Hkv]
    fetched_tokens: np.ndarray  # [L, Hkv] selected tokens that live in the offload tier
    early_exit_fraction: np.ndarray  # [L, Hkv]
    predict: bool  # does the policy run a selection step in this stage


def _layer_multipliers(num_layers: int, resv: ResvConfig) -> np.ndarray:
    lo, hi = resv.layer_ratio_min, resv.layer_ratio_max
    if num_layers == 1 or hi <= 0:
        return np.ones(num_layers)
    spread = np.linspace(lo, hi, num_layers)
    rng = np.random.default_rng(resv.seed)
    spread = rng.permutation(spread)
    return spread / spread.mean()


def _head_multipliers(num_kv_heads: int, resv: ResvConfig) -> np.ndarray:
    if num_kv_heads == 1:
        return np.ones(1)
    spread = np.linspace(0.8, 1.2, num_kv_heads)
    rng = np.random.default_rng(resv.seed + 1)
    return rng.permutation(spread)


def device_window_tokens(system: SystemConfig, policy: str) -> int:
    """Newest tokens per stream that stay in device memory (never fetched over the link).

    The system's window is the KVMU's hierarchical memory on V-Rex (without the KVMU, the
    ablation, the history is managed like the GPU baselines': all of it offloaded) and
    `memory.recent_window_tokens` on a GPU (0 for FlexGen-style offload). A policy whose own
    design keeps a local window on the device (ReKV's sliding-window attention,
    `local_window_tokens` in policies.yaml) keeps it on any system.
    """
    if system.kind == "vrex" and not system.accel.use_kvmu:
        window = 0
    else:
        window = system.memory.recent_window_tokens
    return max(window, int(policy_table()[policy].get("local_window_tokens", 0)))


def resv_selected_tokens(history: int, stage: str, resv: ResvConfig) -> float:
    """Mean selected tokens per (layer, KV head) of the synthetic ReSV model (see module doc)."""
    if history <= 0:
        return 0.0
    if stage == "frame":
        ratio, exponent = resv.frame_ratio, resv.growth_exponent
    else:
        ratio, exponent = resv.text_ratio, resv.text_growth_exponent
    h_ref = resv.reference_history_tokens
    selected = min(float(history), ratio * h_ref * (history / h_ref) ** exponent)
    if stage != "frame":
        # one query row needs no more than a frame's union of rows; the text exponent, fitted
        # to 1K-80K histories, would say otherwise past ~170K
        selected = min(selected, resv_selected_tokens(history, "frame", resv))
    return selected


def make_step(
    system: SystemConfig,
    policy: str,
    stage: str,
    history: int,
    new_tokens: int,
    batch: int,
) -> Step:
    """Build one step's statistics from the synthetic model (no trace)."""
    model, resv = system.model, system.resv
    table = policy_table()
    if policy not in table:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(table)}")
    spec = table[policy]
    num_layers, num_heads = model.num_layers, model.num_kv_heads
    shape = (num_layers, num_heads)
    ratio_key = "frame_ratio" if stage == "frame" else "text_ratio"
    if policy == "resv":
        mean_sel = resv_selected_tokens(history, stage, resv)
        grid = np.outer(_layer_multipliers(num_layers, resv), _head_multipliers(num_heads, resv)) * mean_sel
        selected = np.minimum(np.rint(grid), history)
    else:
        selected = np.full(shape, float(round(spec[ratio_key] * history)))
    window = device_window_tokens(system, policy)
    if not spec.get("offload", True):
        offloaded_fraction = 0.0
    else:
        offloaded = max(0, history - window)
        offloaded_fraction = offloaded / history if history else 0.0
    fetched = np.rint(selected * offloaded_fraction)
    clusters = np.full(num_layers, math.ceil(history / resv.tokens_per_cluster) if history else 0)
    sel_clusters = np.ceil(selected / resv.tokens_per_cluster)
    predict = stage in spec.get("predict_stages", [])
    return Step(
        stage=stage,
        new_tokens=new_tokens,
        history_tokens=history,
        batch=batch,
        vision=stage == "frame",
        clusters=clusters.astype(float),
        selected_tokens=selected,
        selected_clusters=sel_clusters,
        fetched_tokens=fetched,
        early_exit_fraction=np.full(shape, resv.early_exit_fraction),
        predict=predict,
    )


def build_steps(system: SystemConfig, scenario: Scenario) -> dict[str, list[Step]]:
    """Steps per reported stage: 'frame' (one frame), 'decode' (one token), 'e2e' (COIN scenario).

    With a trace (scenario.trace), steps come from the trace instead (sim/trace_replay.py).
    """
    if scenario.trace:
        from sim.trace_replay import steps_from_trace

        return steps_from_trace(scenario.trace, system, scenario.batch, e2e=scenario.stage == "e2e")
    model: ModelConfig = system.model
    h, b, pol = scenario.kv_tokens, scenario.batch, scenario.policy
    steps = {
        "frame": [make_step(system, pol, "frame", h, model.tokens_per_frame, b)],
        "decode": [make_step(system, pol, "decode", h, 1, b)],
    }
    if scenario.stage == "e2e":
        e2e = []
        for _ in range(scenario.frames):
            e2e.append(make_step(system, pol, "frame", h, model.tokens_per_frame, b))
            h += model.tokens_per_frame
        if scenario.question_tokens:
            e2e.append(make_step(system, pol, "text", h, scenario.question_tokens, b))
            h += scenario.question_tokens
        for _ in range(scenario.answer_tokens):
            e2e.append(make_step(system, pol, "decode", h, 1, b))
            h += 1
        steps["e2e"] = e2e
    return steps


def step_macs(model: ModelConfig, step: Step) -> dict[str, float]:
    """Dense MACs of a step (all history attended), per category. Used as the 'useful work'
    that GOPS/W counts on every system, so energy-efficiency gains compare equal work."""
    b, n, h = step.batch, step.new_tokens, step.history_tokens
    m = b * n
    hd, nh, d = model.head_dim, model.num_heads, model.hidden_size
    per_layer = m * model.layer_weights
    attn = 2 * b * n * nh * hd * (h + n)
    macs = {"llm": model.num_layers * (per_layer + attn), "lm_head": b * d * model.vocab_size}
    if step.vision and model.vision_layers:
        mv = b * model.vision_tokens
        dv, fv = model.vision_hidden_size, model.vision_intermediate_size
        macs["vision"] = model.vision_layers * (
            mv * dv * 4 * dv + 2 * mv * dv * fv + 2 * mv * model.vision_tokens * dv
        )
        macs["vision"] += b * n * (dv * model.projector_hidden_size + model.projector_hidden_size * d)
    return macs
