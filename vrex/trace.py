"""The retrieval trace: what ReSV did per step, layer and KV head, as JSON lines.

The simulator (``sim``) replays it; this module is the one place its schema is written down.

Line 1, the header::

    {"kind": "header", "schema": "vrex.trace/1", "model": {num_layers, num_heads, num_kv_heads,
     head_dim, hidden_size, intermediate_size, vocab_size}, "policy": str, "settings": {...},
     "kv_dtype_bytes": int, "hf_config": {...}, "device_kv_budget_bytes": int | null}

``hf_config`` (optional) is the streamed model's Hugging Face config as a dict; the simulator
takes the vision tower's size from it. ``device_kv_budget_bytes`` (optional; null: unbounded)
is what the session's device KV tier could hold; the simulator keeps as many tokens on device.

Then one line per model step::

    {"kind": "step", "step": int, "stage": "frame" | "text" | "decode", "new_tokens": int,
     "history_tokens": int, "latency_ms": {phase: ms},
     "layers": [{"layer": int, "heads": [{"kv_head": int, "history_tokens": int, "clusters": int,
                 "selected_clusters": int, "selected_tokens": int, "early_exit_fraction": float|null,
                 "bytes": {"device": int, "host": int, "disk": int}}]}]}
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

SCHEMA = "vrex.trace/1"
STAGES = ("frame", "text", "decode")
MODEL_FIELDS = (
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
)
HEAD_FIELDS = ("kv_head", "history_tokens", "clusters", "selected_clusters", "selected_tokens")
TIERS = ("device", "host", "disk")
KV_DTYPE_BYTES = (1, 2, 4)  # int8/fp8, fp16/bf16, fp32


class TraceError(ValueError):
    """A trace line does not follow the schema; the message names the line and field."""


def _need(obj: dict, field: str, kind: type | tuple[type, ...], where: str) -> Any:
    if field not in obj:
        raise TraceError(f"{where}: missing field {field!r}")
    value = obj[field]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise TraceError(f"{where}: field {field!r} has the wrong type ({type(value).__name__})")
    return value


def validate_header(rec: dict, where: str = "header") -> dict:
    if rec.get("kind") != "header":
        raise TraceError(f"{where}: the first line must be the header (kind='header')")
    if rec.get("schema") != SCHEMA:
        raise TraceError(
            f"{where}: schema {rec.get('schema')!r} is not {SCHEMA!r}, the one this version reads: "
            "record the trace again with it"
        )
    model = _need(rec, "model", dict, where)
    for f in MODEL_FIELDS:
        if _need(model, f, int, f"{where}.model") < 1:
            raise TraceError(f"{where}.model: {f} must be >= 1, got {model[f]}")
    _need(rec, "policy", str, where)
    _need(rec, "settings", dict, where)
    if _need(rec, "kv_dtype_bytes", int, where) not in KV_DTYPE_BYTES:
        raise TraceError(
            f"{where}: kv_dtype_bytes must be one of {KV_DTYPE_BYTES} (bytes per KV element), "
            f"got {rec['kv_dtype_bytes']}"
        )
    if "hf_config" in rec:
        _need(rec, "hf_config", dict, where)
    budget = rec.get("device_kv_budget_bytes")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0):
        raise TraceError(
            f"{where}: device_kv_budget_bytes must be a positive integer or null, got {budget!r}"
        )
    return rec


def validate_step(rec: dict, where: str = "step") -> dict:
    if rec.get("kind") != "step":
        raise TraceError(f"{where}: kind must be 'step'")
    _need(rec, "step", int, where)
    if _need(rec, "stage", str, where) not in STAGES:
        raise TraceError(f"{where}: stage must be one of {STAGES}")
    for f in ("new_tokens", "history_tokens"):
        if _need(rec, f, int, where) < 0:
            raise TraceError(f"{where}: {f} must be >= 0")
    for layer in _need(rec, "layers", list, where):
        lw = f"{where}.layer"
        _need(layer, "layer", int, lw)
        for head in _need(layer, "heads", list, lw):
            hw = f"{lw}[{layer['layer']}].head"
            for f in HEAD_FIELDS:
                if _need(head, f, int, hw) < 0:
                    raise TraceError(f"{hw}: {f} must be >= 0")
            if head["selected_tokens"] > head["history_tokens"]:
                raise TraceError(f"{hw}: selected_tokens exceeds history_tokens")
            if head["selected_clusters"] > head["clusters"]:
                raise TraceError(f"{hw}: selected_clusters exceeds clusters")
            eef = head.get("early_exit_fraction")
            if eef is not None and not (isinstance(eef, (int, float)) and 0 <= eef <= 1):
                raise TraceError(f"{hw}: early_exit_fraction must be null or in [0, 1]")
            moved = _need(head, "bytes", dict, hw)
            for tier in TIERS:
                if _need(moved, tier, int, f"{hw}.bytes") < 0:
                    raise TraceError(f"{hw}.bytes: {tier} must be >= 0")
    return rec


class TraceWriter:
    """Appends trace lines to a file; the header first."""

    def __init__(self, path: str | os.PathLike, header: dict):
        validate_header(header)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] | None = open(self.path, "w")
        self._write(header)
        self.steps = 0

    def _write(self, rec: dict) -> None:
        assert self._f is not None, "trace writer is closed"
        self._f.write(json.dumps(rec, separators=(",", ":")) + "\n")

    def write_step(self, rec: dict) -> None:
        validate_step(rec, f"step {self.steps}")
        self._write(rec)
        self.steps += 1
        self._f.flush()  # a live session's trace is readable (and replayable) up to its last step

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_trace(path: str | os.PathLike) -> tuple[dict, Iterator[dict]]:
    """The validated header and an iterator over validated step records.

    A last line without its newline that does not parse is a step still being written (a live
    session, or one that crashed mid-write): the trace ends before it, and a warning says so.
    """
    f = open(path, encoding="utf-8")
    try:
        first = f.readline()
    except UnicodeDecodeError:
        f.close()
        raise TraceError(
            f"{path}: not a text file; a trace is {SCHEMA} JSON lines (vrex run --trace)"
        ) from None
    if not first:
        f.close()
        raise TraceError(f"{path}: empty trace")
    try:
        header = validate_header(json.loads(first), f"{path}: header")
    except json.JSONDecodeError as exc:
        f.close()
        raise TraceError(f"{path}:1: not JSON ({exc})") from None
    except TraceError:
        f.close()
        raise

    def steps() -> Iterator[dict]:
        with f:
            for n, line in enumerate(f, start=2):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        if not line.endswith("\n"):  # only the last line can lack it
                            logging.getLogger("vrex.trace").warning(
                                "%s:%d: an unfinished last line (being written?); the trace ends before it",
                                path,
                                n,
                            )
                            return
                        raise TraceError(f"{path}:{n}: not JSON ({exc})") from None
                    yield validate_step(rec, f"{path}:{n}")

    return header, steps()
