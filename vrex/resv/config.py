"""ReSV settings and named presets."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

Scope = Literal["all_heads", "per_head"]
Estimator = Literal["mean", "bound", "radius"]
WeightForm = Literal["softmax", "linear"]
Mass = Literal["all", "retrievable"]


MAX_BUCKETS = 65536  # the hardware has 16; more is a software experiment, not a sort replacement


def _int_in(name: str, value: object, low: int, high: int | None, high_text: str | None = None) -> None:
    """A ValueError naming the field unless value is an int (not a bool) in [low, high]
    (high None: no upper bound); `high_text` says what high is made of."""
    if high is None:
        bound = in_bound = f"a whole number >= {low}"
    else:
        bound = f"[{low}, {f'{high_text} = ' if high_text else ''}{high}]"
        in_bound = f"in {bound}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {'' if high is None else 'a whole number '}{bound}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {in_bound}, got {value}")


def _real_in(name: str, value: object, low: float, high: float, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number in {allowed}, got {value!r}")
    if not (low <= value <= high):  # NaN fails this too
        raise ValueError(f"{name} must be in {allowed}, got {value}")


@dataclass(frozen=True)
class ResvConfig:
    """Everything ReSV does is set here. ``ResvConfig()`` is the paper's setting (``PAPER``);
    ``DEFAULT`` below is ours, with the measurements that chose it. Bad values raise a
    ValueError naming the field and its range.

    ``decode_ratio`` applies to one-token steps (decode), ``text_ratio`` to multi-token text
    steps (the question, an answer primer) when the caller names the stage, ``frame_ratio`` to
    every other multi-token step (frames; the question too when ``text_ratio`` is None). The
    paper splits its ratios by stage (frame / text). Query rows matter because a step fetches
    the union of its rows' cuts: a frame's 201 rows per KV head make up for a tight cut, a
    decode token's 3 do not, and on real weights a question's 15-60 rows did not either, so
    the default cuts text steps like decode ones (docs/research-resv-equal-budget.md).
    ``mass`` says what the ratio is a share of: ``all`` (the paper) counts the always-attended
    sinks and recent window too, so where they hold most of the attention the cut keeps almost
    nothing else; ``retrievable`` counts only the tokens the cut can add.
    """

    n_bits: int = 32
    hamming_threshold: int = 7  # join iff distance < threshold
    scope: Scope = "all_heads"
    similarity_floor: float | None = None  # cosine floor for membership; None = Hamming only
    # a cluster stops accepting members once it holds this many tokens (checked at the start
    # of each step: one step can take it past the cap)
    max_cluster_tokens: int | None = None
    estimator: Estimator = "mean"
    weight_form: WeightForm = "softmax"
    mass: Mass = "all"
    frame_ratio: float = 0.3
    decode_ratio: float = 0.3
    text_ratio: float | None = None  # multi-row text steps (the question); None: frame_ratio
    num_buckets: int | None = None  # set -> the hardware's bucketed early-exit WiCSum
    seed: int = 0

    def __post_init__(self) -> None:
        _int_in("n_bits", self.n_bits, 1, 256)
        _int_in("hamming_threshold", self.hamming_threshold, 1, self.n_bits + 1, "n_bits + 1")  # set both
        if self.scope not in ("all_heads", "per_head"):
            raise ValueError(f"scope must be 'all_heads' or 'per_head', got {self.scope!r}")
        if self.similarity_floor is not None:
            _real_in("similarity_floor", self.similarity_floor, -1.0, 1.0, "[-1, 1] or None")
        if self.max_cluster_tokens is not None:
            _int_in("max_cluster_tokens", self.max_cluster_tokens, 1, None)
        if self.estimator not in ("mean", "bound", "radius"):
            raise ValueError(f"estimator must be mean, bound or radius, got {self.estimator!r}")
        if self.weight_form not in ("softmax", "linear"):
            raise ValueError(f"weight_form must be 'softmax' or 'linear', got {self.weight_form!r}")
        if self.mass not in ("all", "retrievable"):
            raise ValueError(f"mass must be 'all' or 'retrievable', got {self.mass!r}")
        for name in ("frame_ratio", "decode_ratio", "text_ratio"):
            value = getattr(self, name)
            if name == "text_ratio" and value is None:
                continue
            _real_in(name, value, 0.0, 1.0, "(0, 1]")
            if value == 0.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.num_buckets is not None:
            _int_in("num_buckets", self.num_buckets, 1, MAX_BUCKETS)
        _int_in("seed", self.seed, 0, 2**63 - 1)

    def replace(self, **changes: object) -> ResvConfig:
        return dataclasses.replace(self, **changes)

    def ratio_for(self, query_rows: int, stage: str | None = None) -> float:
        """The WiCSum ratio of a step with ``query_rows`` query tokens, in ``stage`` if known."""
        if query_rows == 1:
            return self.decode_ratio
        if stage == "text" and self.text_ratio is not None:
            return self.text_ratio
        return self.frame_ratio


# The paper's settings (Sec. V): 32 hyperplanes over all KV heads, Hamming < 7, ratio 0.3,
# mean-key cluster score.
PAPER = ResvConfig()

# Per-KV-head codes, a cosine membership floor 0.9 (tight clusters: a mean key hides no outlier
# member), frame ratio 0.5, decode ratio 0.97 (a single decode row has no union over rows to make
# up for a tight cut) and text ratio 0.97 (the question is one step per answer, so a wide cut there
# costs few bytes, and at 0.5 it missed 12% of the question's attention mass on bigbuckbunny and
# lost needles the wide cut keeps). Chosen by `vrex bench fidelity --part default` plus the
# text-ratio runs; the measurements are in docs/bench_results_fidelity.md and
# docs/research-resv-equal-budget.md.
DEFAULT = ResvConfig(
    scope="per_head",
    hamming_threshold=9,
    similarity_floor=0.9,
    frame_ratio=0.5,
    decode_ratio=0.97,
    text_ratio=0.97,
)

# read-only: an entry changed in place would change the preset of every later session
PRESETS: Mapping[str, ResvConfig] = MappingProxyType({"paper": PAPER, "default": DEFAULT})


def preset(name: str) -> ResvConfig:
    """A named ReSV configuration: ``paper`` (the paper's settings) or ``default`` (ours)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown ReSV preset {name!r}; choose one of {sorted(PRESETS)}") from None
