"""Sweeps: space validation, sampling, determinism, objectives, caching and resume, executors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

import sim.sweep as sweep  # noqa: E402
from sim.api import area, simulate  # noqa: E402
from sim.sweep import load_space, run_sweep, sample_points  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

GRID = {
    "system": "vrex8",
    "scenario": {"kv_tokens": 20000},
    "sampler": "grid",
    "parameters": {
        "accel.num_cores": [4, 8],
        "memory.link_bandwidth_gbps": {"low": 2, "high": 8, "num": 3, "log": True},
        "kv_tokens": [5000, 40000],
    },
}
LHS = {
    "system": "vrex8",
    "sampler": "lhs",
    "samples": 10,
    "seed": 3,
    "parameters": {
        "accel.clock_mhz": {"low": 400, "high": 1200},
        "accel.num_cores": {"low": 2, "high": 16},
        "memory.dram_type": ["lpddr5", "hbm2e"],
        "resv.frame_ratio": {"low": 0.1, "high": 0.5},
    },
}


def _run(space, out, **kw):
    kw.setdefault("progress", False)
    return run_sweep(space, out, **kw)


# ------------------------------------------------------------------ spaces and sampling


def test_grid_is_the_cartesian_product():
    points = sample_points(load_space(GRID))
    assert len(points) == 2 * 3 * 2
    bws = sorted({p["memory.link_bandwidth_gbps"] for p in points})
    assert bws == pytest.approx([2.0, 4.0, 8.0])  # geometric
    assert {p["accel.num_cores"] for p in points} == {4, 8}


def test_lhs_is_stratified_seeded_and_typed():
    space = load_space(LHS)
    a, b = sample_points(space), sample_points(space)
    assert a == b  # same seed, same points
    other = sample_points(load_space({**LHS, "seed": 4}))
    assert a != other
    n = LHS["samples"]
    strata = sorted(int((p["accel.clock_mhz"] - 400) / 800 * n) for p in a)
    assert strata == list(range(n))  # one sample per stratum
    assert all(isinstance(p["accel.num_cores"], int) for p in a)  # int field: rounded
    assert {p["memory.dram_type"] for p in a} == {"lpddr5", "hbm2e"}  # 5 of each stratum half


def test_random_sampler_stays_in_range():
    space = load_space({**LHS, "sampler": "random", "samples": 25})
    for p in sample_points(space):
        assert 400 <= p["accel.clock_mhz"] <= 1200 and 2 <= p["accel.num_cores"] <= 16


@pytest.mark.parametrize(
    "change, field",
    [
        ({"parameters": {"accel.num_corez": [1, 2]}}, "accel.num_corez"),
        ({"parameters": {"accel.num_cores": [8, 0]}}, "accel.num_cores"),
        ({"parameters": {"accel.num_cores": ["many"]}}, "accel.num_cores"),
        ({"parameters": {"memory.dram_type": ["ddr9"]}}, "memory.dram_type"),
        ({"parameters": {"kv_tokens": [-5]}}, "kv_tokens"),
        ({"parameters": {"accel.clock_mhz": {"low": 900, "high": 400}}}, "accel.clock_mhz"),
        ({"parameters": {"accel.clock_mhz": {"low": 400, "high": 900}}}, "accel.clock_mhz"),  # grid needs num
        ({"parameters": {"accel.clock_mhz": {"low": 400, "hi": 900}}}, "accel.clock_mhz"),
        ({"parameters": {"memory.dram_type": {"low": 1, "high": 2, "num": 2}}}, "memory.dram_type"),
        ({"parameters": {"accel": [1]}}, "accel"),
        ({"parameters": {}}, "parameters"),
        ({"sampler": "sobol"}, "sampler"),
        ({"sampler": "lhs"}, "samples"),
        ({"objectives": {"speed": "max"}}, "objectives.speed"),
        ({"overrides": {"memory.link_bandwidth_gbpz": 4}}, "memory.link_bandwidth_gbpz"),
        ({"scenario": {"batch": 0}}, "batch"),
        ({"grid": True}, "grid"),
        ({"sampler": "lhs", "samples": True}, "samples"),  # YAML's true was taken for 1, then a traceback
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"parameters": {"accel.sram_kb": [256, 256.0]}}, "parameters.accel.sram_kb: 256.0 is listed twice"),
        (
            {"parameters": {"batch": [1], "scenario.batch": [2, 4]}},
            "batch and scenario.batch are the same field",
        ),
        ({"parameters": {"kind": ["vrex", "gpu"]}}, "parameters.kind"),
        (
            {"parameters": {"trace": ["/nonexistent.jsonl"]}},
            "parameters.trace: /nonexistent.jsonl is not a file",
        ),
    ],
)
def test_bad_spaces_name_the_field(change, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_space({**GRID, **change})


def test_bad_combination_names_the_point_and_field(tmp_path):
    space = {
        "sampler": "grid",
        "parameters": {"resv.layer_ratio_min": [0.1, 0.4], "resv.layer_ratio_max": [0.3, 0.5]},
    }  # each value is fine alone; (0.4, 0.3) is not
    with pytest.raises(ValueError, match=r"point 2 .*resv\.layer_ratio_min"):
        _run(space, tmp_path / "r.parquet")
    assert not (tmp_path / "r.parquet").exists()


def test_cli_reports_bad_space_naming_the_field(tmp_path, capsys):
    from vrex.cli import main

    bad = tmp_path / "space.yaml"
    bad.write_text("parameters:\n  accel.num_corez: [1, 2]\n")
    assert main(["sim", "sweep", "--space", str(bad), "--out", str(tmp_path / "r.parquet")]) == 2
    assert "accel.num_corez" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text("parameters:\n  accel.num_cores: [4]\n")
    assert (
        main(["sim", "sweep", "--space", str(good), "--out", str(tmp_path / "r.parquet"), "--top", "0"]) == 2
    )
    assert "--top must be >= 1" in capsys.readouterr().err
    assert main(["sim", "sweep", "--space", str(good), "--out", str(tmp_path / "r.csv")]) == 2
    assert "*.parquet" in capsys.readouterr().err


# ------------------------------------------------------------------ results


def test_objectives_agree_with_the_simulator(tmp_path):
    res = _run(
        {"sampler": "grid", "scenario": {"batch": 2}, "parameters": {"accel.num_cores": [4, 8]}},
        tmp_path / "r.parquet",
    )
    df = res.results
    row = df[df["accel.num_cores"] == 8].iloc[0]
    ref = simulate("vrex8", {"batch": 2})
    assert row["fps"] == pytest.approx(ref["fps"])
    assert row["throughput_fps"] == pytest.approx(2 * ref["fps"])
    assert row["energy_per_frame_j"] == pytest.approx(ref["energy_per_frame_mj"] * 1e-3)
    assert ref["frame_step_energy_mj"] == pytest.approx(2 * ref["energy_per_frame_mj"])  # two streams
    power = ref["frame_step_energy_mj"] / ref["frame_latency_ms"]
    assert row["fps_per_w"] == pytest.approx(ref["throughput_fps"] / power)
    assert row["edp_j_s"] == pytest.approx(row["energy_per_frame_j"] * ref["frame_latency_ms"] * 1e-3)
    assert row["area_mm2"] == pytest.approx(area("vrex8")["chip_total"]["area_mm2"])
    assert row["config_hash"] == ref["config_hash"]  # the column is simulate()'s hash
    small = df[df["accel.num_cores"] == 4].iloc[0]
    assert small["area_mm2"] < row["area_mm2"]
    # files: results, front, one cache entry per config
    back = pd.read_parquet(res.out)
    assert len(back) == 2 and back["pareto"].dtype == bool
    assert len(pd.read_parquet(res.pareto_out)) == int(back["pareto"].sum()) >= 1
    assert len(list(res.cache_dir.glob("*.json"))) == 2


def test_gpu_points_have_no_area_and_the_front_skips_it(tmp_path):
    res = _run(
        {
            "system": "agx-orin",
            "scenario": {"policy": "flexgen"},
            "sampler": "grid",
            "parameters": {"memory.link_bandwidth_gbps": [2, 8]},
        },
        tmp_path / "g.parquet",
    )
    assert res.results["area_mm2"].isna().all()
    # more bandwidth is faster and no worse in energy: the 8 GB/s point alone is on the front
    assert res.pareto["memory.link_bandwidth_gbps"].tolist() == [8]


def test_points_that_do_not_fit_in_dram_are_recorded_as_infeasible(tmp_path):
    res = _run(
        {"sampler": "grid", "parameters": {"memory.dram_capacity_gb": [8, 32]}},
        tmp_path / "cap.parquet",
    )
    small, big = (res.results[res.results["memory.dram_capacity_gb"] == v].iloc[0] for v in (8, 32))
    assert "memory.dram_capacity_gb=8 is too small" in small["infeasible"] and pd.isna(small["fps"])
    assert pd.isna(big["infeasible"]) and big["fps"] > 0
    assert res.pareto["memory.dram_capacity_gb"].tolist() == [32]


def test_a_space_of_infeasible_points_has_no_front_and_json_has_no_nan(tmp_path, capsys):
    from vrex.cli import main

    space = tmp_path / "tiny.yaml"
    space.write_text("scenario: {kv_tokens: 1000}\nparameters: {memory.dram_capacity_gb: [1, 2]}\n")
    out = tmp_path / "r.parquet"
    assert main(["sim", "sweep", "--space", str(space), "--out", str(out), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)  # strict JSON: NaN would not parse in jq
    assert summary["infeasible"] == 2 and summary["pareto_points"] == 0 and summary["front"] == []


def test_a_huge_space_is_refused_before_any_work_and_leaves_nothing(tmp_path):
    axes = {"low": 1, "high": 64, "num": 64}
    space = {
        "parameters": {"accel.num_cores": axes, "accel.clock_mhz": {"low": 400, "high": 1200, "num": 50}}
    }
    space["parameters"]["memory.link_bandwidth_gbps"] = {"low": 1, "high": 64, "num": 50}
    with pytest.raises(ValueError, match=r"160,000 points, over the 100,000 allowed \(--max-points\)"):
        run_sweep(space, tmp_path / "r.parquet", progress=False)
    assert not any(tmp_path.iterdir())  # no empty cache folder either


def test_integer_ranges_sample_every_integer_alike():
    space = load_space(
        {"sampler": "random", "samples": 4000, "parameters": {"accel.num_cores": {"low": 1, "high": 4}}}
    )
    counts = [sum(p["accel.num_cores"] == n for p in sample_points(space)) for n in (1, 2, 3, 4)]
    assert min(counts) > 900  # rounding gave the two ends ~650 each


def test_parameters_that_do_not_go_together_are_recorded_as_infeasible(tmp_path):
    """Each value in range, the pair not: 256 trees of 64 need 64 KB of weight tiles, so 96 KB
    of SRAM is too small for them and fine for 64 trees."""
    res = _run(
        {"sampler": "grid", "parameters": {"accel.dpe_trees": [64, 256], "accel.sram_kb": [96, 384]}},
        tmp_path / "pairs.parquet",
    )
    rows = res.results.set_index(["accel.dpe_trees", "accel.sram_kb"])
    assert "accel.sram_kb=96 is too small" in rows.loc[(256, 96), "infeasible"]
    assert pd.isna(rows.loc[(256, 96), "fps"])
    assert rows["infeasible"].isna().sum() == 3


def test_unset_offload_figures_sweep_as_ranges(tmp_path):
    """The tier's figures are unset (the SSD's or the host's own); a range still works."""
    res = _run(
        {
            "sampler": "grid",
            "parameters": {"memory.offload_read_bandwidth_gbps": {"low": 0.5, "high": 6, "num": 2}},
        },
        tmp_path / "tier.parquet",
    )
    lat = res.results.set_index("memory.offload_read_bandwidth_gbps")["frame_latency_ms"]
    assert list(lat.index) == [0.5, 6.0] and lat[0.5] > 2 * lat[6.0]


def test_sweep_is_deterministic(tmp_path):
    a = _run(LHS, tmp_path / "a" / "r.parquet").results
    b = _run(LHS, tmp_path / "b" / "r.parquet").results
    pd.testing.assert_frame_equal(a, b)
    assert a["config_hash"].nunique() == len(a)


def test_interrupted_sweep_resumes_without_recomputing(tmp_path, monkeypatch):
    out = tmp_path / "r.parquet"
    total = len(sample_points(load_space(GRID)))
    calls = []
    real = sweep.evaluate

    def counted(system, scenario):
        calls.append(1)
        if len(calls) == 5 and not getattr(counted, "resumed", False):
            raise KeyboardInterrupt  # Ctrl-C after 5 points
        return real(system, scenario)

    monkeypatch.setattr(sweep, "evaluate", counted)
    with pytest.raises(KeyboardInterrupt):
        _run(GRID, out, chunk_size=1)
    assert len(list(sweep.cache_dir_for(out).glob("*.json"))) == 4
    assert not out.exists()
    calls.clear()
    counted.resumed = True
    res = _run(GRID, out)
    assert len(calls) == total - 4 and res.computed == total - 4 and res.cached == 4
    calls.clear()
    again = _run(GRID, out)  # everything cached now
    assert calls == [] and again.cached == total
    monkeypatch.setattr(sweep, "evaluate", real)
    fresh = _run(GRID, tmp_path / "fresh.parquet").results
    pd.testing.assert_frame_equal(res.results, fresh)


def test_killed_cli_sweep_resumes(tmp_path):
    """SIGKILL a real `vrex sim sweep` mid-run; the rerun simulates only what is not cached."""
    space = tmp_path / "space.yaml"
    space.write_text(
        json.dumps(
            {
                "sampler": "grid",
                "parameters": {
                    "kv_tokens": [5000 * i for i in range(1, 11)],
                    "accel.num_cores": [2, 4, 8, 16],
                    "memory.link_bandwidth_gbps": [2, 4, 8],
                },
            }
        )
    )
    out = tmp_path / "r.parquet"
    cache = sweep.cache_dir_for(out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vrex.cli",
            "sim",
            "sweep",
            "--space",
            str(space),
            "--out",
            str(out),
            "--no-progress",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if cache.exists() and len(list(cache.glob("*.json"))) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(cache.glob("*.json")))
    assert done >= 3
    res = _run(load_space(space), out)
    assert res.cached == done and res.computed == 120 - done


# ------------------------------------------------------------------ executors


def test_local_process_pool_matches_in_process(tmp_path):
    a = _run(LHS, tmp_path / "a.parquet").results
    b = _run(LHS, tmp_path / "b.parquet", workers=2).results
    pd.testing.assert_frame_equal(a, b)


def test_dask_local_cluster_matches_local(tmp_path):
    distributed = pytest.importorskip("dask.distributed", reason="dask[distributed] is not installed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    )
    client = distributed.Client(cluster)
    try:
        res = _run(GRID, tmp_path / "d.parquet", executor="dask", client=client)
        assert res.computed == len(res.results) == 12
        assert sum(client.run(lambda: 1).values()) == 2  # two workers answered
    finally:
        client.close()
        cluster.close()
    local = _run(GRID, tmp_path / "l.parquet").results
    pd.testing.assert_frame_equal(res.results, local)


def test_sensitivity_finds_the_knob_that_matters(tmp_path):
    space = {
        "sampler": "lhs",
        "samples": 16,
        "seed": 0,
        "scenario": {"kv_tokens": 40000},
        "parameters": {
            "memory.link_bandwidth_gbps": {"low": 1, "high": 16, "log": True},
            "resv.seed": {"low": 0, "high": 1000},
        },
    }
    df = _run(space, tmp_path / "s.parquet").results
    table = sweep.sensitivity(df, ["memory.link_bandwidth_gbps", "resv.seed"], ["fps", "area_mm2"])
    assert table.loc["memory.link_bandwidth_gbps", "fps"] > 0.9  # at 40K the link bounds fps
    assert abs(table.loc["resv.seed", "fps"]) < table.loc["memory.link_bandwidth_gbps", "fps"]
    oat = sweep.one_at_a_time("vrex8", {"accel.num_cores": (4, 16)}, {"kv_tokens": 40000})
    area_row = oat[oat.objective == "area_mm2"].iloc[0]
    assert area_row.low_pct < 0 < area_row.high_pct


def test_progress_bar_shows_points_done_and_eta(tmp_path, capsys):
    space = {"sampler": "grid", "parameters": {"accel.num_cores": [2, 4, 8]}}
    run_sweep(space, tmp_path / "p.parquet", progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "<" in err  # tqdm: done/total [elapsed<remaining]
    run_sweep(space, tmp_path / "p.parquet", progress=True)  # all cached: the bar starts full
    assert "3/3" in capsys.readouterr().err


def test_a_changed_simulator_does_not_reuse_the_cache(tmp_path, monkeypatch):
    space = {"sampler": "grid", "parameters": {"accel.num_cores": [2, 4]}}
    assert _run(space, tmp_path / "r.parquet").computed == 2
    assert _run(space, tmp_path / "r.parquet").cached == 2
    monkeypatch.setattr(sweep, "simulator_fingerprint", lambda: "recalibrated")
    again = _run(space, tmp_path / "r.parquet")
    assert again.computed == 2 and again.cached == 0


def test_sweep_over_a_technology_entry(tmp_path):
    space = {
        "system": "vrex8",
        "scenario": {"kv_tokens": 20000},
        "sampler": "grid",
        "parameters": {"tech.lpddr5_energy_pj_per_bit": {"low": 4, "high": 8, "num": 3}},
    }
    df = _run(space, tmp_path / "tech.parquet").results.sort_values("tech.lpddr5_energy_pj_per_bit")
    assert df["tech.lpddr5_energy_pj_per_bit"].tolist() == [4.0, 6.0, 8.0]
    assert df["energy_per_frame_j"].is_monotonic_increasing and df["energy_per_frame_j"].nunique() == 3
    assert df["frame_latency_ms"].nunique() == 1


def test_designs_are_compared_under_the_same_workload(tmp_path):
    # one front per history: a 1K point always beat every 40K point, which emptied the 40K front
    space = {"parameters": {"kv_tokens": [1000, 40000], "accel.num_cores": [4, 8]}}
    res = _run(space, tmp_path / "r.parquet")
    fronts = res.results[res.results["pareto"]]
    assert set(fronts["kv_tokens"]) == {1000, 40000}
    assert sweep.workload_parameters(load_space(space)) == ["kv_tokens"]


def test_an_e2e_sweep_reports_the_whole_question(tmp_path):
    space = {"scenario": {"stage": "e2e", "kv_tokens": 1000}, "parameters": {"frames": [1, 8]}}
    res = _run({**space, "objectives": {"e2e_latency_ms": "min", "area_mm2": "min"}}, tmp_path / "r.parquet")
    short, long = (res.results[res.results["frames"] == n].iloc[0] for n in (1, 8))
    assert (
        0 < short["e2e_latency_ms"] < long["e2e_latency_ms"] and long["e2e_energy_j"] > short["e2e_energy_j"]
    )
