"""Paper reproduction, trace replay, CLI and plots."""

import json
from pathlib import Path

import pytest

from sim.api import compare, simulate
from sim.trace_replay import read_trace
from sim.validate import load_reference, validation_table
from vrex.cli import main as sim_main

TRACE = Path(__file__).parent / "data" / "trace_small.jsonl"


def test_fig13_vrex8_frame_latency_within_15pct():
    ref = load_reference()["fig13_edge_vrex8_batch1"]
    for kv, published in zip(ref["kv_tokens"], ref["frame_latency_ms"], strict=True):
        ours = simulate("vrex8", {"kv_tokens": kv})["frame_latency_ms"]
        assert ours == pytest.approx(published, rel=0.15), kv


def test_fig13_tpot_and_edge_speedup_ranges():
    ref = load_reference()["fig13_edge_vrex8_batch1"]
    points = compare("vrex8", "agx-orin", "flexgen", ref["kv_tokens"], 1)["points"]
    tpots = [p["tpot_ms"] for p in points]
    assert min(tpots) == pytest.approx(ref["tpot_ms_range"][0], rel=0.15)
    assert max(tpots) == pytest.approx(ref["tpot_ms_range"][1], rel=0.15)
    speedups = [p["speedup"] for p in points]
    assert min(speedups) == pytest.approx(ref["speedup_vs_agx_flexgen_range"][0], rel=0.2)
    assert max(speedups) == pytest.approx(ref["speedup_vs_agx_flexgen_range"][1], rel=0.2)
    assert speedups == sorted(speedups)


def test_validate_table_reports_every_row():
    rows = validation_table(quick=True)
    assert len(rows) > 40
    for r in rows:
        assert {"figure", "published", "ours", "tolerance", "pass"} <= set(r)
    assert sum(r["pass"] for r in rows) >= 0.75 * len(rows)
    # Fig. 19 (ReSV ablation): scoring every key must cost speed, and full ReSV is the Fig. 16 point.
    by_name = {r["figure"]: r for r in rows}
    no_clustering = by_name["Fig19 V-Rex8 no clustering speedup @40K"]
    full = by_name["Fig19 V-Rex8 full ReSV speedup @40K"]
    assert 1 < no_clustering["ours"] < full["ours"]
    assert full["ours"] == by_name["Fig16 V-Rex8 all speedup @40K"]["ours"]
    assert "same hardware" in no_clustering["note"]


def test_reference_path_env(monkeypatch, tmp_path):
    from sim import validate

    fake = tmp_path / "ref.json"
    fake.write_text(json.dumps({"x": 1}))
    monkeypatch.setenv("VREX_PAPER_JSON", str(fake))
    assert validate.reference_path() == fake


def test_trace_replay_moves_exactly_the_traced_bytes():
    header, steps = read_trace(TRACE)
    assert header["schema"] == "vrex.trace/1" and len(steps) == 3
    res = simulate("vrex8", {"trace": str(TRACE)})
    assert res["system_config"]["model"]["num_layers"] == 2
    for stage in ("frame", "text", "decode"):
        traced = sum(
            h["bytes"]["host"] + h["bytes"]["disk"]
            for s in steps
            if s["stage"] == stage
            for layer in s["layers"]
            for h in layer["heads"]
        )
        assert res["stages"][stage]["counters"].get("link_read_bytes", 0.0) == pytest.approx(traced)
    assert res["tpot_ms"] < res["frame_latency_ms"]


def test_trace_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"kind": "header", "schema": "vrex.trace/9", "model": {}}) + "\n")
    with pytest.raises(ValueError, match="schema"):
        read_trace(bad)
    bad.write_text(json.dumps({"kind": "step", "stage": "frame"}) + "\n")
    with pytest.raises(ValueError, match="header"):
        read_trace(bad)
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "missing.jsonl")
    # a video given as a trace: not text, said as such
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42\xb8\xff\xfe rest of a video\n")
    with pytest.raises(ValueError, match="bad.jsonl: not a text file"):
        read_trace(bad)
    # another schema: the file, and what to do
    header = json.loads(TRACE.read_text().splitlines()[0])
    bad.write_text(json.dumps({**header, "schema": "vrex.trace/2"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: header: schema .* record the trace again"):
        read_trace(bad)
    bad.write_text(json.dumps({**header, "device_kv_budget_bytes": 0}) + "\n")
    with pytest.raises(ValueError, match="device_kv_budget_bytes must be a positive integer or null"):
        read_trace(bad)
    # sizes that would divide by zero or cost negative bytes
    for dtype_bytes in (0, -2, 3):
        bad.write_text(json.dumps({**header, "kv_dtype_bytes": dtype_bytes}) + "\n")
        with pytest.raises(ValueError, match=r"kv_dtype_bytes must be one of \(1, 2, 4\)"):
            read_trace(bad)
    bad.write_text(json.dumps({**header, "model": {**header["model"], "num_kv_heads": 0}}) + "\n")
    with pytest.raises(ValueError, match="num_kv_heads must be >= 1, got 0"):
        read_trace(bad)


def test_a_trace_cut_mid_line_ends_before_it(tmp_path, caplog):
    """A live or crashed session can leave half a step line; the complete steps replay."""
    lines = TRACE.read_text().splitlines()
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2])
    header, steps = read_trace(cut)
    assert len(steps) == len(lines) - 1
    assert "unfinished last line" in caplog.text
    # a broken line with its newline (or lines after it) is an error, not an end
    cut.write_text("\n".join([*lines, lines[-1][:20], lines[-1]]) + "\n")
    with pytest.raises(ValueError, match="not JSON"):
        read_trace(cut)


def test_cli_run_area_compare_json(capsys):
    assert sim_main(["sim", "run", "--system", "vrex8", "--kv-tokens", "5000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "frame_latency_ms",
        "fps",
        "tpot_ms",
        "energy_per_frame_mj",
        "gops_per_w",
        "events",
        "sim_wall_s",
        "latency_breakdown_ms",
        "energy_breakdown_mj",
    ):
        assert key in out
    assert sim_main(["sim", "area", "--system", "vrex48", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_cores"] == 48
    assert sim_main(["sim", "compare", "--kv-tokens", "1000,40000", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["points"]) == 2
    assert sim_main(["sim", "run", "--set", "accel.num_cores=0"]) == 2
    assert "accel.num_cores" in capsys.readouterr().err
    assert sim_main(["sim", "run", "--trace", str(TRACE), "--stage", "text"]) == 0


def test_plots_are_written(tmp_path):
    from sim.plots import make_all

    paths = make_all(tmp_path)
    assert [p.name for p in paths] == ["latency_breakdown.png", "layer_bandwidth.png", "roofline.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_plots_of_any_system_and_bad_layer(tmp_path, capsys):
    out = tmp_path / "mine"
    args = ["sim", "plot", "--system", "vrex8", "--set", "accel.num_cores=16", "--kv-tokens", "5000,20000"]
    assert sim_main([*args, "--out", str(out), "--json"]) == 0
    paths = [Path(p) for p in json.loads(capsys.readouterr().out)["plots"]]
    assert [p.name for p in paths] == ["latency_breakdown.png", "layer_bandwidth.png", "roofline.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    bad = tmp_path / "bad"
    assert sim_main(["sim", "plot", "--system", "vrex8", "--layer", "32", "--out", str(bad)]) == 2
    assert "[0, 31]" in capsys.readouterr().err
    assert not bad.exists()  # failed before drawing anything
    assert sim_main(["sim", "plot", "--system", "agx-orin", "--out", str(bad)]) == 2
    assert "GPU baseline" in capsys.readouterr().err
    assert sim_main(["sim", "plot", "--system", "vrex8", "--batch", "0", "--out", str(bad)]) == 2
    assert "batch=0 is out of range" in capsys.readouterr().err
    assert not bad.exists()
