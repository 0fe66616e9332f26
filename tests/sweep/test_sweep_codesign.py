"""`vrex codesign`: engine trace -> simulator, trace-driven next to the synthetic statistics."""

import json
from pathlib import Path

import pytest

from vrex.cli import main
from vrex.codesign import run_codesign, simulate_trace

TRACE = Path(__file__).resolve().parents[1] / "sim" / "data" / "trace_small.jsonl"


def _sample(name):
    from vrex.video import sample_video

    try:
        return sample_video(name)
    except FileNotFoundError as exc:
        pytest.skip(f"sample video missing: {exc}")


@pytest.fixture(scope="module")
def tiny_dir(tiny_smolvlm_dir):
    import torch

    torch.set_num_threads(1)
    return tiny_smolvlm_dir


def test_simulate_trace_columns_are_consistent():
    rep = simulate_trace(TRACE)
    t, s, b = rep["trace_driven"], rep["synthetic"], rep["baseline_result"]
    assert rep["frames"] >= 1 and rep["device_window_tokens"] == 100_000_000
    for col in (t, s):
        assert col["fps"] == pytest.approx(1e3 / col["frame_latency_ms"])
        assert col["speedup"] == pytest.approx(b["frame_latency_ms"] / col["frame_latency_ms"])
        assert 0.0 <= col["selected_fraction"] <= 1.0
    # the trace-driven column reports what the trace says was selected
    lines = [json.loads(x) for x in TRACE.read_text().splitlines()[1:]]
    frames = [r for r in lines if r["stage"] == "frame"]
    heads = [h for r in frames for layer in r["layers"] for h in layer["heads"]]
    expected = sum(h["selected_tokens"] for h in heads) / sum(h["history_tokens"] for h in heads)
    assert t["selected_fraction"] == pytest.approx(expected)


def test_a_trace_without_frames_is_an_error(tmp_path):
    header = TRACE.read_text().splitlines()[0]
    bad = tmp_path / "t.jsonl"
    bad.write_text(header + "\n")
    with pytest.raises(ValueError, match="no frame steps"):
        simulate_trace(bad)
    with pytest.raises(ValueError, match="GPU baseline"):
        simulate_trace(TRACE, system="a100")


def test_codesign_loop_on_a_real_video(tiny_dir, tmp_path):
    video = _sample("bikes.mp4")
    trace = tmp_path / "trace.jsonl"
    rep = run_codesign(
        video,
        trace=trace,
        model=str(tiny_dir),
        fps=4,
        max_seconds=5,
        max_new_tokens=3,
        device_kv_budget_bytes=96 * 1024,
    )
    assert trace.exists()
    assert rep["frames"] == rep["run"]["session"]["frames_accepted"] >= 15
    assert rep["decode_steps"] >= 1
    # the engine's device tier (96 KiB) forced offload; the trace-driven column moves exactly
    # the host/disk tokens the trace recorded, in V-Rex's BF16 (the CPU recorded its own dtype)
    header, *rest = trace.read_text().splitlines()
    recorded = json.loads(header)["kv_dtype_bytes"]
    assert json.loads(header)["device_kv_budget_bytes"] == 96 * 1024
    lines = [json.loads(x) for x in rest]
    moved = sum(
        h["bytes"]["host"] + h["bytes"]["disk"]
        for r in lines
        if r["stage"] == "frame"
        for layer in r["layers"]
        for h in layer["heads"]
    )
    assert moved > 0
    assert rep["trace_driven"]["fetched_bytes_per_frame"] == pytest.approx(
        moved / rep["frames"] * 2 / recorded
    )
    assert rep["device_window_tokens"] < rep["history_tokens"][1]
    for col in ("trace_driven", "synthetic"):
        assert rep[col]["fps"] > 0 and rep[col]["energy_per_frame_j"] > 0 and rep[col]["speedup"] > 1


def test_codesign_cli_json_and_errors(tiny_dir, tmp_path, capsys):
    video = _sample("bikes.mp4")
    rc = main(
        [
            "codesign",
            "--video",
            str(video),
            "--model",
            str(tiny_dir),
            "--fps",
            "1",
            "--max-seconds",
            "3",
            "--max-new-tokens",
            "2",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["system"] == "vrex8" and out["baseline"] == "agx-orin + flexgen"
    assert out["trace_driven"]["speedup"] > 0
    assert main(["codesign", "--video", str(tmp_path / "missing.mp4")]) == 2
    assert "missing.mp4" in capsys.readouterr().err
