"""Replay a retrieval trace (JSON lines, schema vrex.trace/1) written by the serving side.

Line 1 is a header {"kind": "header", "schema": "vrex.trace/1", "model": {...}, "policy": ...,
"kv_dtype_bytes": 2}; every further line is a step {"kind": "step", "stage": "frame" | "text" |
"decode", "new_tokens": n, "history_tokens": H, "layers": [{"layer": l, "heads": [{"kv_head":
h, "history_tokens": H, "clusters": C, "selected_clusters": c, "selected_tokens": s,
"early_exit_fraction": f, "bytes": {"device": .., "host": .., "disk": ..}}]}]}.

The schema and its validation live in `vrex.trace`, the one module of `vrex` that sim reads.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from sim.config import POLICIES, SystemConfig, validate
from sim.hf import model_from_hf
from sim.workload import Step, policy_table
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
    no cost model for (window, topk) are costed like ReSV's scoring pass."""
    name = str(header.get("policy", "resv"))
    return name if name in POLICIES else "resv"


def system_for_trace(system: SystemConfig, header: dict) -> SystemConfig:
    """Use the traced model's dimensions (and KV dtype) in the simulated system; its vision
    tower too when the header carries the model's HF config (older traces keep the default,
    and the model's name says so)."""
    model = header.get("model") or {}
    changes: dict = {k: int(model[k]) for k in MODEL_FIELDS if k in model}
    if "kv_dtype_bytes" in header:
        changes["dtype_bytes"] = int(header["kv_dtype_bytes"])
    hf = header.get("hf_config")
    if hf:
        tower = model_from_hf(hf, system.model)
        changes.update({k: getattr(tower, k) for k in VISION_FIELDS})
        changes["name"] = f"traced {hf.get('_name_or_path') or hf.get('model_type') or 'model'}"
    else:
        changes["name"] = f"traced model (vision tower of {system.model.name})"
    system = replace(system, model=replace(system.model, **changes))
    validate(system)
    return system


def _step(record: dict, system: SystemConfig, batch: int, predict_stages: list[str]) -> Step:
    model = system.model
    shape = (model.num_layers, model.num_kv_heads)
    selected, sel_clusters, fetched = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    early = np.zeros(shape)
    clusters = np.zeros(model.num_layers)
    per_token = model.kv_bytes_per_token_head
    for layer in record.get("layers", []):
        l_idx = int(layer["layer"])
        if not 0 <= l_idx < model.num_layers:
            raise ValueError(
                f"trace step {record.get('step')}: layer {l_idx} outside [0, {model.num_layers})"
            )
        for head in layer.get("heads", []):
            h = int(head["kv_head"])
            if not 0 <= h < model.num_kv_heads:
                raise ValueError(
                    f"trace step {record.get('step')}: kv_head {h} outside [0, {model.num_kv_heads})"
                )
            selected[l_idx, h] = head.get("selected_tokens", 0)
            sel_clusters[l_idx, h] = head.get("selected_clusters", 0)
            eef = head.get("early_exit_fraction")  # null: the exact (non-bucketed) selector ran
            early[l_idx, h] = system.resv.early_exit_fraction if eef is None else eef
            clusters[l_idx] = max(clusters[l_idx], head.get("clusters", 0))
            moved = head.get("bytes") or {}
            fetched[l_idx, h] = (moved.get("host", 0) + moved.get("disk", 0)) / per_token
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
    system = system_for_trace(system, header)
    spec = policy_table().get(header.get("policy", "resv"), policy_table()["resv"])
    predict_stages = spec.get("predict_stages", [])
    grouped: dict[str, list[Step]] = {"frame": [], "text": [], "decode": []}
    ordered = [_step(record, system, batch, predict_stages) for record in records]
    for step in ordered:
        grouped[step.stage].append(step)
    if not ordered:
        raise ValueError(f"{path}: the trace has a header but no step lines; record at least one step")
    if e2e:
        grouped["e2e"] = ordered
    return grouped
