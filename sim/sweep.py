"""Design-space sweeps: sample config fields, simulate every point, keep the Pareto front.

A space is a YAML file (or a dict of the same shape)::

    system: vrex8                 # base system: built-in name or YAML file
    overrides: {memory.link_bandwidth_gbps: 4}   # fixed changes to the base system
    scenario: {kv_tokens: 40000, batch: 1}       # fixed scenario fields
    sampler: lhs                  # grid | random | lhs (Latin hypercube)
    samples: 32                   # points for random / lhs
    seed: 0
    parameters:                   # any config field by dotted name, or a scenario field
      accel.num_cores: [4, 8, 16]                         # a list: grid values / choices
      memory.link_bandwidth_gbps: {low: 2, high: 16, log: true}
      accel.clock_mhz: {low: 400, high: 1200, num: 3}     # `num` makes a range griddable
      kv_tokens: [10000, 40000]
      tech.lpddr5_energy_pj_per_bit: {low: 3, high: 8}  # a technology-table entry
    objectives: {fps: max, energy_per_frame_j: min, area_mm2: min}   # optional

The Pareto front is per workload: points are compared only with points of the same swept
scenario fields (history, batch, stage, ...; the policy is a design choice) and technology
corner. A stage-e2e scenario adds the whole question's `e2e_latency_ms` and `e2e_energy_j`.

Every value is checked through the override mechanism of `sim.config` before anything runs,
so a bad field or value is an error naming it. Results are cached per point by config hash
(one JSON file per point in `<out>.cache/`), so an interrupted sweep resumes where it stopped;
the key also holds a fingerprint of the simulator's code and data files, so results of an
older simulator are never reused. The `config_hash` column is `simulate()`'s config hash.
Executors: `local` (processes) and `dask` (an existing cluster via its address, or a local
one); Ray is not implemented (one distributed engine is enough; see `run_sweep`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, fields, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from sim.api import area, resolve_scenario, resolve_system, simulate
from sim.config import (
    InfeasibleDesign,
    Scenario,
    SystemConfig,
    config_hash,
    field_applies,
    override,
    read_yaml_mapping,
    validate,
)
from sim.pareto import pareto_mask
from sim.tech import load_entries, tech_for

SAMPLERS = ("grid", "random", "lhs")
EXECUTORS = ("local", "dask")
CACHE_SCHEMA = "vrex.sweep/3"  # 2: per-stream energies at batch > 1, infeasible points; 3: e2e
DEFAULT_OBJECTIVES = {"fps": "max", "energy_per_frame_j": "min", "area_mm2": "min"}
# what evaluate() returns per point, with the direction that is better
METRICS = {
    "fps": "max",
    "throughput_fps": "max",
    "frame_latency_ms": "min",
    "energy_per_frame_j": "min",
    "power_w": "min",
    "fps_per_w": "max",
    "edp_j_s": "min",
    "area_mm2": "min",
    "peak_power_w": "min",
    "gops_per_w": "max",
    "tpot_ms": "min",
    "energy_per_token_mj": "min",
    "e2e_latency_ms": "min",  # the whole COIN question (scenario stage e2e; else empty)
    "e2e_energy_j": "min",
}
_SPACE_KEYS = ("system", "overrides", "scenario", "sampler", "samples", "seed", "parameters", "objectives")
_SCENARIO_FIELDS = tuple(f.name for f in fields(Scenario))


@dataclass(frozen=True)
class Parameter:
    """One swept field: either explicit `values` or a numeric range [low, high]."""

    name: str  # as written in the space (a column of the results)
    target: str  # "system" or "scenario"
    path: str  # dotted path inside the target
    values: tuple | None = None
    low: float | None = None
    high: float | None = None
    num: int | None = None  # grid points of a range
    log: bool = False
    integer: bool = False  # the field is an int: sampled values are rounded


@dataclass(frozen=True)
class SweepSpace:
    system: SystemConfig
    scenario: Scenario
    sampler: str
    samples: int | None
    seed: int
    parameters: tuple[Parameter, ...]
    objectives: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_OBJECTIVES))


@dataclass
class SweepResult:
    results: Any  # pandas DataFrame, one row per point
    pareto: Any  # pandas DataFrame, the rows on the front
    computed: int  # points simulated in this run
    cached: int  # points read back from the cache
    wall_s: float
    out: Path
    pareto_out: Path
    cache_dir: Path


# ---------------------------------------------------------------- the space


def _get(obj: Any, path: str) -> Any:
    root = obj
    for part in path.split("."):
        obj = getattr(obj, part)
    if obj is None and path.startswith("tech."):  # unpinned: the table's value at the corner
        return tech_for(root)[path[len("tech.") :]]
    if obj is None and path.startswith("memory.offload_"):  # unset: the tier's own figure
        return root.memory.offload(path[len("memory.offload_") :])
    return obj


def _split(name: str) -> tuple[str, str]:
    """Route a parameter name to the system or the scenario."""
    if name.startswith("scenario."):
        return "scenario", name[len("scenario.") :]
    if name.split(".", 1)[0] in _SCENARIO_FIELDS:
        return "scenario", name
    return "system", name


def _apply(system: SystemConfig, scenario: Scenario, values: dict[str, Any], params) -> tuple:
    for p in params:
        if p.name not in values:
            continue
        if p.target == "system":
            system = override(system, p.path, values[p.name])
        else:
            scenario = override(scenario, p.path, values[p.name])
    try:
        validate(system)
    except InfeasibleDesign:
        pass  # a result of the sweep, not an error in it: `evaluate` records it
    validate(scenario)
    return system, scenario


def _parameter(name: str, spec: Any, system: SystemConfig, scenario: Scenario) -> Parameter:
    where = f"parameters.{name}"
    if not isinstance(name, str) or not name:
        raise ValueError(f"parameters: names must be dotted config fields, got {name!r}")
    target, path = _split(name)
    base = system if target == "system" else scenario
    try:
        current = _get(base, path)
    except AttributeError:
        current = None
    if is_dataclass(current):
        raise ValueError(f"{where}: {path!r} is a group of fields; sweep one of its fields instead")
    try:  # the override mechanism names an unknown field and lists the known ones
        override(base, path, current)
    except ValueError as exc:
        hint = "" if target == "scenario" else f" (scenario fields: {', '.join(_SCENARIO_FIELDS)})"
        raise ValueError(f"{where}: {exc}{hint}") from None
    if target == "system" and path == "kind":  # a V-Rex and a GPU system share no hardware fields
        raise ValueError(
            f"{where}: the kind of system is not a design choice; sweep each system in its own space"
        )

    def check(value: Any) -> None:
        try:
            _apply(system, scenario, {name: value}, [Parameter(name, target, path)])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if target == "scenario" and path == "trace" and value and not Path(value).is_file():
            raise ValueError(f"{where}: {value} is not a file; give vrex.trace/1 JSON-lines files")

    integer = isinstance(current, int) and not isinstance(current, bool)
    if isinstance(spec, list | tuple):
        if not spec:
            raise ValueError(f"{where}: the list of values is empty")
        for i, v in enumerate(spec):
            if v in spec[:i]:  # the same point twice, on the front twice
                raise ValueError(f"{where}: {v!r} is listed twice")
            check(v)
        return Parameter(name, target, path, values=tuple(spec), integer=integer)
    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "num", "log"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; use low, high, num, log")
        if not isinstance(current, int | float) or isinstance(current, bool):
            raise ValueError(f"{where}: a low/high range needs a numeric field; give a list of values")
        try:
            low, high = float(spec["low"]), float(spec["high"])
        except KeyError as exc:
            raise ValueError(f"{where}: a range needs both low and high (missing {exc})") from None
        except (TypeError, ValueError):
            raise ValueError(f"{where}: low and high must be numbers") from None
        if low > high:
            raise ValueError(f"{where}: low={low} is above high={high}")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise ValueError(f"{where}: a log range needs low > 0")
        num = spec.get("num")
        if num is not None and (not isinstance(num, int) or num < 1):
            raise ValueError(f"{where}: num must be a positive integer, got {num!r}")
        check(low)
        check(high)
        return Parameter(name, target, path, low=low, high=high, num=num, log=log, integer=integer)
    # a single value: a fixed setting, convenient when editing spaces
    check(spec)
    return Parameter(name, target, path, values=(spec,), integer=integer)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's `true` is no count


def load_space(space: str | Path | dict[str, Any]) -> SweepSpace:
    """Read and validate a space (YAML path or dict); errors name the offending field."""
    if isinstance(space, str | Path):
        path = Path(space)
        if not path.exists():
            raise FileNotFoundError(f"sweep space file not found: {path}")
        data = read_yaml_mapping(path, "sweep-space keys")
    else:
        data = dict(space)
    if not isinstance(data, dict):
        raise ValueError("a sweep space must be a mapping (system, scenario, sampler, parameters, ...)")
    unknown = set(data) - set(_SPACE_KEYS)
    if unknown:
        raise ValueError(
            f"unknown sweep-space key(s) {', '.join(sorted(unknown))}; known: {', '.join(_SPACE_KEYS)}"
        )
    try:
        system = resolve_system(str(data.get("system", "vrex8")), data.get("overrides") or None)
    except ValueError as exc:
        raise ValueError(f"system/overrides: {exc}") from None
    try:
        scenario = resolve_scenario(data.get("scenario") or {})
    except ValueError as exc:
        raise ValueError(f"scenario: {exc}") from None
    sampler = data.get("sampler", "grid")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not known; choose one of {', '.join(SAMPLERS)}")
    samples = data.get("samples")
    if sampler != "grid" and (not _whole(samples) or samples < 1):
        raise ValueError(
            f"samples: the {sampler} sampler needs a positive integer number of samples, got {samples!r}"
        )
    seed = data.get("seed", 0)
    if not _whole(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    raw = data.get("parameters")
    if not isinstance(raw, dict) or not raw:
        raise ValueError("parameters: give at least one field to sweep (a mapping of name: values)")
    params = tuple(_parameter(name, spec, system, scenario) for name, spec in raw.items())
    seen: dict[tuple[str, str], str] = {}
    for p in params:  # `batch` and `scenario.batch` are one field: one would silently win
        if (p.target, p.path) in seen:
            raise ValueError(
                f"parameters: {seen[p.target, p.path]} and {p.name} are the same field; keep one"
            )
        seen[p.target, p.path] = p.name
    if sampler == "grid":
        for p in params:
            if p.values is None and p.num is None:
                raise ValueError(f"parameters.{p.name}: a range needs `num` for grid sampling")
    objectives = data.get("objectives") or dict(DEFAULT_OBJECTIVES)
    if isinstance(objectives, list):
        objectives = {name: METRICS.get(name, "") for name in objectives}
    for name, sense in objectives.items():
        if name not in METRICS:
            raise ValueError(f"objectives.{name}: not a metric; choose from {', '.join(METRICS)}")
        if sense not in ("max", "min"):
            raise ValueError(f"objectives.{name}: sense must be max or min, got {sense!r}")
    return SweepSpace(system, scenario, sampler, samples, seed, params, dict(objectives))


# ---------------------------------------------------------------- sampling


def _from_unit(p: Parameter, u: float) -> Any:
    """Map u in [0, 1) to a value of the parameter; an integer range gives each of its
    integers an equal stratum of u (rounding would give the two ends half as much)."""
    if p.values is not None:
        return p.values[min(int(u * len(p.values)), len(p.values) - 1)]
    high = p.high + 1 if p.integer else p.high  # integers: [low, high + 1), then floored
    if p.log:
        value = math.exp(math.log(p.low) + u * (math.log(high) - math.log(p.low)))
    else:
        value = p.low + u * (high - p.low)
    return min(int(math.floor(value)), int(p.high)) if p.integer else float(value)


def _typed(p: Parameter, value: float) -> Any:
    return int(round(value)) if p.integer else float(value)


def _grid_values(p: Parameter) -> list[Any]:
    if p.values is not None:
        return list(p.values)
    if p.num == 1:
        return [_typed(p, p.low)]
    raw = np.geomspace(p.low, p.high, p.num) if p.log else np.linspace(p.low, p.high, p.num)
    out: list[Any] = []
    for v in raw:
        v = _typed(p, float(v))
        if v not in out:  # integer rounding can merge neighbours
            out.append(v)
    return out


MAX_POINTS = 100_000  # ~1 h at the ~40 ms a 40K point takes here; --max-points raises it


def count_points(space: SweepSpace) -> int:
    """How many points `sample_points` makes, without making them."""
    if space.sampler != "grid":
        return int(space.samples)
    return math.prod(len(_grid_values(p)) for p in space.parameters)


def sample_points(space: SweepSpace) -> list[dict[str, Any]]:
    """The points of the space, deterministic for a given seed."""
    params = space.parameters
    if space.sampler == "grid":
        import itertools

        grids = [_grid_values(p) for p in params]
        return [
            dict(zip([p.name for p in params], combo, strict=True)) for combo in itertools.product(*grids)
        ]
    rng = np.random.default_rng(space.seed)
    n = space.samples
    if space.sampler == "random":
        unit = rng.random((n, len(params)))
    else:  # Latin hypercube: one sample in each of n strata per dimension
        unit = np.empty((n, len(params)))
        for j in range(len(params)):
            unit[:, j] = (rng.permutation(n) + rng.random(n)) / n
    return [{p.name: _from_unit(p, float(unit[i, j])) for j, p in enumerate(params)} for i in range(n)]


def resolve_point(space: SweepSpace, point: dict[str, Any], index: int | None = None) -> tuple:
    """(SystemConfig, Scenario) of one point; ValueError names the point and the field."""
    try:
        return _apply(space.system, space.scenario, point, space.parameters)
    except ValueError as exc:
        where = f"point {index} " if index is not None else "point "
        raise ValueError(f"{where}{point}: {exc}") from None


@lru_cache(maxsize=1)
def simulator_fingerprint() -> str:
    """Hash of the simulator's code and data files: a recalibrated simulator gets a fresh cache."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("*.py"), *root.glob("data/*"), *root.glob("systems/*")]):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def point_key(system: SystemConfig, scenario: Scenario) -> str:
    """Cache key: the config hash, the simulator fingerprint, and the trace's content if any."""
    extra = {"simulator": simulator_fingerprint()}
    if scenario.trace:
        extra["trace_sha256"] = hashlib.sha256(Path(scenario.trace).read_bytes()).hexdigest()[:16]
    return config_hash(system, scenario, extra)


# ---------------------------------------------------------------- evaluation


def evaluate(system: SystemConfig, scenario: Scenario) -> dict[str, float | None]:
    """Objectives of one design point (runs in a worker process)."""
    out: dict[str, float | None] = dict.fromkeys(METRICS)
    try:
        res = simulate(system, scenario)
    except InfeasibleDesign as exc:  # an infeasible point is a result, not a failed sweep
        return {**out, "infeasible": str(exc)}
    out["infeasible"] = None
    lat_ms = res["frame_latency_ms"]
    step_mj = res["frame_step_energy_mj"]  # one frame step, all streams of the batch
    if lat_ms:
        energy_j = res["energy_per_frame_mj"] * 1e-3
        power_w = step_mj / lat_ms  # mJ / ms
        out.update(
            fps=res["fps"],
            throughput_fps=res["throughput_fps"],
            frame_latency_ms=lat_ms,
            energy_per_frame_j=energy_j,
            power_w=power_w,
            fps_per_w=res["throughput_fps"] / power_w if power_w > 0 else None,
            edp_j_s=energy_j * lat_ms * 1e-3,
            gops_per_w=res["gops_per_w"],
        )
    out["tpot_ms"] = res["tpot_ms"]
    out["energy_per_token_mj"] = res["energy_per_token_mj"]
    if res.get("e2e_latency_ms") is not None:
        out["e2e_latency_ms"] = res["e2e_latency_ms"]
        out["e2e_energy_j"] = res["e2e_energy_mj"] * 1e-3
    if system.kind == "vrex":
        chip = area(system)["chip_total"]
        out["area_mm2"] = chip["area_mm2"]
        out["peak_power_w"] = chip["power_mw"] * 1e-3
    return out


def _evaluate_chunk(chunk: list[tuple[str, SystemConfig, Scenario]]) -> list[tuple[str, dict]]:
    return [(key, evaluate(system, scenario)) for key, system, scenario in chunk]


def _iter_local(chunks: list, workers: int) -> Iterator[list[tuple[str, dict]]]:
    if workers <= 1:  # in-process: no pool start-up, easiest to debug
        for chunk in chunks:
            yield _evaluate_chunk(chunk)
        return
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(_evaluate_chunk, chunk) for chunk in chunks]
        for fut in as_completed(futures):
            yield fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _iter_dask(chunks: list, workers: int, client=None, address: str | None = None):
    try:
        from dask.distributed import Client, LocalCluster
        from dask.distributed import as_completed as dask_as_completed
    except ImportError:
        raise ValueError(
            "--executor dask needs Dask: pip install 'dask[distributed]' (or use --executor local)"
        ) from None
    cluster = None
    own = client is None
    if own:
        if address:
            client = Client(address)
        else:
            cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1, dashboard_address=None)
            client = Client(cluster)
    try:
        futures = client.map(_evaluate_chunk, chunks, pure=False)
        for fut in dask_as_completed(futures):
            yield fut.result()
    finally:
        if own:
            client.close()
            if cluster is not None:
                cluster.close()


# ---------------------------------------------------------------- the sweep


def _stem(out: Path) -> str:
    return out.name[: -len(".parquet")] if out.name.endswith(".parquet") else out.name


def cache_dir_for(out: str | Path) -> Path:
    """results.parquet -> results.cache/ (one JSON file per config hash)."""
    out = Path(out)
    return out.with_name(_stem(out) + ".cache")


def pareto_path_for(out: str | Path) -> Path:
    """results.parquet -> results.pareto.parquet."""
    out = Path(out)
    return out.with_name(_stem(out) + ".pareto.parquet")


def _read_cache(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a half-written file from a killed run: recompute it
    if record.get("schema") != CACHE_SCHEMA:
        return None
    return record.get("metrics")


def _write_cache(cache_dir: Path, key: str, metrics: dict) -> None:
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"schema": CACHE_SCHEMA, "config_hash": key, "metrics": metrics}))
    os.replace(tmp, cache_dir / f"{key}.json")  # atomic: a kill never leaves a torn entry


def run_sweep(
    space: SweepSpace | str | Path | dict,
    out: str | Path,
    *,
    workers: int = 1,
    executor: str = "local",
    client=None,
    scheduler_address: str | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
    on_result: Callable[[str, dict], None] | None = None,
    max_points: int = MAX_POINTS,
) -> SweepResult:
    """Simulate every point of `space`, write `out` (parquet) and `<stem>.pareto.parquet`.

    Points whose config hash is in `<stem>.cache/` are read back, not recomputed; each new
    result is cached as soon as it arrives, so a killed sweep resumes. `executor="dask"` uses
    `client` (a dask.distributed Client), else `scheduler_address`, else a LocalCluster of
    `workers` processes (one distributed engine: Dask runs on a laptop, an SSH cluster or
    Kubernetes alike).
    """
    try:
        import pandas as pd
        import pyarrow  # noqa: F401 - the parquet writer
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ValueError(
            f"sweeps need pandas, pyarrow and tqdm ({exc.name} is missing): pip install 'vrex[sweep]'"
        ) from None

    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r} is not known; choose one of local, dask")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not isinstance(space, SweepSpace):
        space = load_space(space)
    start = time.perf_counter()
    out = Path(out)
    cache_dir = cache_dir_for(out)
    count = count_points(space)
    if count > max_points:
        raise ValueError(
            f"the space has {count:,} points, over the {max_points:,} allowed (--max-points): "
            "sample it (sampler: lhs or random, samples: N) or coarsen the grid"
        )
    points = sample_points(space)
    resolved = [resolve_point(space, p, i) for i, p in enumerate(points)]  # all errors up front
    keys = [point_key(s, c) for s, c in resolved]
    cache_dir.mkdir(parents=True, exist_ok=True)  # only for a space that checked out
    metrics: dict[str, dict] = {}
    todo: dict[str, tuple[SystemConfig, Scenario]] = {}
    for key, cfg in zip(keys, resolved, strict=True):
        if key in metrics or key in todo:
            continue
        cached = _read_cache(cache_dir / f"{key}.json")
        if cached is not None:
            metrics[key] = cached
        else:
            todo[key] = cfg
    n_cached = len(metrics)
    tasks = [(key, s, c) for key, (s, c) in todo.items()]
    if chunk_size is None:  # a few chunks per worker keeps the bar moving and workers busy
        chunk_size = max(1, min(16, len(tasks) // (8 * workers) or 1))
    chunks = [tasks[i : i + chunk_size] for i in range(0, len(tasks), chunk_size)]
    if executor == "dask":
        stream = _iter_dask(chunks, workers, client, scheduler_address)
    else:
        stream = _iter_local(chunks, workers)
    bar = tqdm(total=n_cached + len(tasks), initial=n_cached, desc="sweep", unit="pt", disable=not progress)
    computed = 0
    try:
        for batch in stream:
            for key, values in batch:
                _write_cache(cache_dir, key, values)
                metrics[key] = values
                computed += 1
                if on_result is not None:
                    on_result(key, values)
            bar.update(len(batch))
    finally:
        bar.close()
        if hasattr(stream, "close"):
            stream.close()

    rows = []
    for i, (point, key) in enumerate(zip(points, keys, strict=True)):
        system, scenario = resolved[i]
        row = {"point": i, "config_hash": config_hash(system, scenario), **point, **metrics[key]}
        rows.append(row)
    df = pd.DataFrame(rows)
    for name in METRICS:
        df[name] = pd.to_numeric(df[name], errors="coerce").astype(float)
    df["pareto"] = _fronts(df, space)
    pareto = df[df["pareto"]].reset_index(drop=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    pareto_out = pareto_path_for(out)
    _write_parquet(df, out)
    _write_parquet(pareto, pareto_out)
    return SweepResult(
        results=df,
        pareto=pareto,
        computed=computed,
        cached=n_cached,
        wall_s=time.perf_counter() - start,
        out=out,
        pareto_out=pareto_out,
        cache_dir=cache_dir,
    )


def workload_parameters(space: SweepSpace) -> list[str]:
    """Swept fields that set the workload or the technology, not the design: designs are only
    compared under the same ones (a shorter history or the low corner is no better design)."""
    return [
        p.name
        for p in space.parameters
        if (p.target == "scenario" and p.path != "policy") or p.name == "tech_corner"
    ]


def _fronts(df, space: SweepSpace):
    """The Pareto mask: one front per combination of the workload parameters."""
    mask = np.zeros(len(df), dtype=bool)
    groups = workload_parameters(space)
    for _, group in df.groupby(groups, dropna=False, sort=False) if groups else [(None, df)]:
        objectives = {k: v for k, v in space.objectives.items() if group[k].notna().any()}
        values = group[list(objectives)].to_numpy(dtype=float)
        mask[group.index.to_numpy()] = pareto_mask(values, list(objectives.values()))
    return mask


def _write_parquet(df, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


# ---------------------------------------------------------------- which knobs matter


def sensitivity(df, params: list[str], objectives: list[str]):
    """Spearman rank correlation of each numeric parameter with each objective (a DataFrame).

    +1: the objective rises with the knob everywhere in the sample, 0: no monotone effect.
    Non-numeric parameters (strings) are left out; constant columns give NaN.
    """
    import pandas as pd

    ranks = {}
    for p in params:
        col = df[p]
        if col.dtype == bool:
            col = col.astype(int)
        if pd.api.types.is_numeric_dtype(col):
            ranks[p] = col.rank()
    table = {}
    for obj in objectives:
        target = df[obj].rank()
        table[obj] = {p: r.corr(target) for p, r in ranks.items()}
    return pd.DataFrame(table)


def one_at_a_time(
    system: SystemConfig | str,
    knobs: dict[str, tuple[Any, Any]],
    scenario: Scenario | dict | None = None,
    objectives: tuple[str, ...] = ("fps", "energy_per_frame_j", "area_mm2"),
):
    """Change one knob at a time to its low and high value; % change of each objective.

    Returns a DataFrame (knob, objective, low_pct, high_pct) for a tornado plot.
    """
    import pandas as pd

    base_sys = resolve_system(system)
    base_scn = resolve_scenario(scenario)
    params = {name: Parameter(name, *_split(name)) for name in knobs}
    base = evaluate(base_sys, base_scn)
    if base["infeasible"]:
        raise InfeasibleDesign(base["infeasible"])
    rows = []
    for name, (low, high) in knobs.items():
        changed = []
        for value in (low, high):
            s, c = _apply(base_sys, base_scn, {name: value}, [params[name]])
            changed.append(evaluate(s, c))
        for obj in objectives:
            b = base.get(obj)
            if b is None or b == 0:
                continue
            rows.append(
                {
                    "knob": name,
                    "objective": obj,
                    "low": low,
                    "high": high,
                    # NaN: the knob's value makes the point infeasible (does not fit in DRAM)
                    "low_pct": (changed[0][obj] / b - 1) * 100
                    if changed[0][obj] is not None
                    else float("nan"),
                    "high_pct": (changed[1][obj] / b - 1) * 100
                    if changed[1][obj] is not None
                    else float("nan"),
                }
            )
    return pd.DataFrame(rows)


TECH_OBJECTIVES = ("energy_per_frame_j", "energy_per_token_mj", "area_mm2", "peak_power_w")


def tech_sensitivity(
    system: SystemConfig | str,
    scenario: Scenario | dict | None = None,
    objectives: tuple[str, ...] = TECH_OBJECTIVES,
):
    """Which technology numbers matter for one design point: every table entry with a range
    moved alone to its low and its high value (one_at_a_time). Rows are sorted by the widest
    swing of any objective; technology changes energy and area, never timing."""
    kind = (resolve_system(system) if isinstance(system, str) else system).kind
    knobs = {
        f"tech.{name}": (e.low, e.high)
        for name, e in load_entries().items()
        if e.low != e.high and field_applies(kind, f"tech.{name}")  # a GPU baseline reads a few
    }
    df = one_at_a_time(system, knobs, scenario, objectives)
    swing = (df["high_pct"] - df["low_pct"]).abs().groupby(df["knob"]).max()
    order = {knob: rank for rank, knob in enumerate(swing.sort_values(ascending=False).index)}
    return df.assign(_rank=df["knob"].map(order)).sort_values(["_rank", "objective"]).drop(columns="_rank")
