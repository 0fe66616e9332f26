"""Replay a retrieval trace (JSON lines, schema vrex.trace/1) written by the serving side.

Line 1 is a header {"kind": "header", "schema": "vrex.trace/1", "model": {...}, "policy": ...,
"kv_dtype_bytes": 2}; every further line is a step {"kind": "step", "stage": "frame" | "text" |
"decode", "new_tokens": n, "history_tokens": H, "layers": [{"layer": l, "heads": [{"kv_head":
h, "history_tokens": H, "clusters": C, "selected_clusters": c, "selected_tokens": s,
"early_exit_fraction": f, "bytes": {"device": .., "host": .., "disk": ..}}]}]}.

The schema and its validation live in `vrex.trace`, the one module of `vrex` that sim reads.

The replay simulates the traced model in the system's own precision (BF16 on V-Rex, whatever
the engine recorded in: a CPU records fp32); the recorded KV dtype only turns the trace's
bytes into tokens. `--set model.dtype_bytes=4` simulates the recorded precision instead, and
any `--set` wins over what the trace says.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from sim.config import POLICIES, RANGES, SystemConfig, validate
from sim.hf import model_from_hf
from sim.workload import Step, policy_table
from vrex.limits import POLICIES as SERVING_POLICIES
from vrex.trace import MODEL_FIELDS
from vrex.trace import read_trace as _read_trace


def read_trace(path: str | Path) -> tuple[dict, list[dict]]:
    """Return (header, steps), validated against the vrex.trace schema."""
    header, steps = _read_trace(path)
    return header, list(steps)


VISION_FIELDS = ("vision_layers", "vision_hidden_size", "vision_intermediate_size", "vision_tokens")


def trace_policy(header: dict) -> str:
    """The simulator policy whose costs (prediction kernels, device window) match the traced
    one. The selection itself always comes from the trace; serving policies the simulator has
    no cost model for are costed like ReSV (`topk` scores every key as ReSV's scoring pass
    does; `window` scores nothing: `_predict_stages`)."""
    name = str(header.get("policy"))
    if name not in SERVING_POLICIES:
        raise ValueError(
            f"the trace's policy {name!r} is not one the engine runs ({', '.join(SERVING_POLICIES)})"
        )
    return name if name in POLICIES else "resv"


def _predict_stages(header: dict) -> list[str]:
    """Stages whose steps pay a prediction (scoring) pass: none for a recency window."""
    if header.get("policy") == "window":
        return []
    return policy_table()[trace_policy(header)].get("predict_stages", [])


def recorded_token_bytes(header: dict) -> int:
    """Bytes of one token's key and value in one KV head, as the engine stored them."""
    return 2 * int(header["model"]["head_dim"]) * int(header["kv_dtype_bytes"])


def device_window_tokens(header: dict) -> int | None:
    """Tokens (all layers) the engine's device KV tier held, from the header's budget, as the
    simulator's recent window (None: the trace does not say). An unbounded device tier
    offloaded nothing: the largest window."""
    if "device_kv_budget_bytes" not in header:
        return None
    budget = header["device_kv_budget_bytes"]
    largest = int(RANGES["memory.recent_window_tokens"][1])
    if budget is None:
        return largest
    per_token = (
        recorded_token_bytes(header)
        * int(header["model"]["num_kv_heads"])
        * int(header["model"]["num_layers"])
    )
    return int(min(largest, budget // max(per_token, 1)))


def system_for_trace(system: SystemConfig, header: dict, where: str = "trace") -> SystemConfig:
    """Use the traced model's dimensions in the simulated system (its precision stays the
    system's), its vision tower too when the header carries the model's HF config, and, on
    V-Rex, the engine's device KV tier as the recent window when the header gives it."""
    model = header.get("model") or {}
    changes: dict = {k: int(model[k]) for k in MODEL_FIELDS if k in model}
    hf = header.get("hf_config")
    tower_note = ""
    if hf:
        try:
            tower = model_from_hf(hf, system.model)
        except ValueError as exc:  # the header's own dimensions still stand
            tower, tower_note = None, f"; its hf_config has no usable vision tower ({exc})"
        if tower is not None:
            changes.update({k: getattr(tower, k) for k in VISION_FIELDS})
            changes["name"] = f"traced {hf.get('_name_or_path') or hf.get('model_type') or 'model'}"
    if "name" not in changes:
        changes["name"] = f"traced model (vision tower of {system.model.name}{tower_note})"
    system = replace(system, model=replace(system.model, **changes))
    window = device_window_tokens(header)
    if window is not None and system.kind == "vrex":  # a GPU baseline keeps its own policy's window
        system = replace(system, memory=replace(system.memory, recent_window_tokens=window))
    validate(system, prefix=f"{where}: header: ")
    return system


def _step(
    record: dict, system: SystemConfig, batch: int, predict_stages: list[str], token_bytes: int, where: str
) -> Step:
    """One traced step; `token_bytes` turns the trace's bytes into tokens (recorded dtype)."""
    model = system.model
    shape = (model.num_layers, model.num_kv_heads)
    selected, sel_clusters, fetched = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    early = np.zeros(shape)
    clusters = np.zeros(model.num_layers)
    here = f"{where}: step {record.get('step')}"
    seen = np.zeros(shape, dtype=int)
    for layer in record.get("layers", []):
        l_idx = int(layer["layer"])
        if not 0 <= l_idx < model.num_layers:
            raise ValueError(f"{here}: layer {l_idx} outside [0, {model.num_layers})")
        for head in layer.get("heads", []):
            h = int(head["kv_head"])
            if not 0 <= h < model.num_kv_heads:
                raise ValueError(f"{here}: kv_head {h} outside [0, {model.num_kv_heads})")
            if head["history_tokens"] != record["history_tokens"]:
                raise ValueError(
                    f"{here}: layer {l_idx} kv_head {h} says history_tokens {head['history_tokens']}, "
                    f"the step {record['history_tokens']}"
                )
            seen[l_idx, h] += 1
            selected[l_idx, h] = head.get("selected_tokens", 0)
            sel_clusters[l_idx, h] = head.get("selected_clusters", 0)
            eef = head.get("early_exit_fraction")  # null: the exact (non-bucketed) selector ran
            early[l_idx, h] = system.resv.early_exit_fraction if eef is None else eef
            clusters[l_idx] = max(clusters[l_idx], head.get("clusters", 0))
            moved = head.get("bytes") or {}
            fetched[l_idx, h] = (moved.get("host", 0) + moved.get("disk", 0)) / token_bytes
    if record["history_tokens"] and (seen != 1).any():
        layer, head = (int(i) for i in np.argwhere(seen != 1)[0])
        raise ValueError(
            f"{here}: layer {layer} kv_head {head} appears {seen[layer, head]} times; a step with a history "
            f"has each of the simulated model's {model.num_layers} layers and {model.num_kv_heads} KV heads once"
        )
    stage = record["stage"]
    return Step(
        stage=stage,
        new_tokens=int(record["new_tokens"]),
        history_tokens=int(record["history_tokens"]),
        batch=batch,
        vision=stage == "frame",
        clusters=clusters,
        selected_tokens=selected,
        selected_clusters=sel_clusters,
        fetched_tokens=np.minimum(fetched, selected),
        early_exit_fraction=early,
        predict=stage in predict_stages,
    )


def steps_from_trace(
    path: str | Path, system: SystemConfig, batch: int = 1, e2e: bool = False
) -> dict[str, list[Step]]:
    """Steps grouped by stage ('frame', 'text', 'decode') for simulate(); with `e2e`, also
    every step in the trace's order as 'e2e' (the whole recorded stream, end to end)."""
    header, records = read_trace(path)
    predict_stages = _predict_stages(header)
    grouped: dict[str, list[Step]] = {"frame": [], "text": [], "decode": []}
    token_bytes = recorded_token_bytes(header)
    ordered = [_step(record, system, batch, predict_stages, token_bytes, str(path)) for record in records]
    for step in ordered:
        grouped[step.stage].append(step)
    if not ordered:
        raise ValueError(f"{path}: the trace has a header but no step lines; record at least one step")
    if e2e:
        grouped["e2e"] = ordered
    return grouped
