"""The `vrex sim` command line as a user meets it: bad files, traces, per-frame units, imports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sim.api import simulate
from sim.plots import layer_bandwidth
from vrex.cli import main as vrex_main

TRACE = Path(__file__).parent / "data" / "trace_small.jsonl"


@pytest.mark.parametrize(
    "text, words",
    [
        ("accel:\n  num_cores: [1\n", ["not valid YAML"]),
        ("- 1\n- 2\n", ["mapping", "list"]),
        ("memory:\n  link_bandwidth_gbps: true\n", ["memory.link_bandwidth_gbps", "number"]),
        ("base: vrex48\n", None),  # fine: the base is used
    ],
)
def test_config_files_fail_with_the_file_and_field(tmp_path, capsys, text, words):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    rc = vrex_main(["sim", "run", "--config", str(f), "--kv-tokens", "1000", "--json"])
    out = capsys.readouterr()
    if words is None:
        assert rc == 0 and json.loads(out.out)["system"] == "vrex48"
        return
    assert rc == 2
    for word in words:
        assert word in out.err


@pytest.mark.parametrize(
    "text, problem",
    [
        (
            "base: vrex8\nmemory:\n  link_bandwidth_gbps: 8\n   bad: 1\n",
            "at line 4, column 7: mapping values are not allowed here",
        ),
        (  # the unclosed bracket's own line and column too
            "base: vrex8\naccel: {num_cores: 8\nmemory: {}\n",
            "at line 3, column 7: expected ',' or '}', but got ':' "
            "(while parsing a flow mapping at line 2, column 8)",
        ),
    ],
)
def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path, capsys, text, problem):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    for argv in (["sim", "run", "--config", str(f)], ["sim", "area", "--system", str(f)]):
        assert vrex_main(argv) == 2
        assert capsys.readouterr().err == f"vrex: error: {f} is not valid YAML {problem}\n"


def test_config_base_and_system_must_agree(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("base: vrex48\naccel:\n  num_cores: 24\n")
    assert vrex_main(["sim", "area", "--config", str(f), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_cores"] == 24
    assert vrex_main(["sim", "area", "--system", "vrex8", "--config", str(f)]) == 2
    assert "base: vrex48" in capsys.readouterr().err
    assert vrex_main(["sim", "run", "--config", str(tmp_path)]) == 2  # a folder
    assert "folder" in capsys.readouterr().err


def test_trace_replay_reports_the_trace_not_the_scenario(tmp_path, capsys):
    assert vrex_main(["sim", "run", "--trace", str(TRACE)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "traced model" in header and "up to 215 KV tokens" in header and "40000" not in header
    assert vrex_main(["sim", "run", "--trace", str(TRACE), "--policy", "flexgen"]) == 2
    assert "recorded policy 'resv'" in capsys.readouterr().err
    frames_only = tmp_path / "frames.jsonl"
    lines = TRACE.read_text().splitlines()
    frames_only.write_text("\n".join([lines[0]] + [x for x in lines[1:] if '"stage": "frame"' in x]) + "\n")
    assert vrex_main(["sim", "run", "--trace", str(frames_only), "--stage", "text"]) == 2
    assert "has no answer tokens to report for --stage text" in capsys.readouterr().err
    question_only = tmp_path / "question.jsonl"
    question_only.write_text("\n".join([lines[0]] + [x for x in lines[1:] if '"stage": "text"' in x]) + "\n")
    assert vrex_main(["sim", "run", "--trace", str(question_only), "--stage", "text", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["latency_breakdown_ms"]["ffn"] > 0
    # e2e: every traced step in order, frames, question and answer together
    assert vrex_main(["sim", "run", "--trace", str(TRACE), "--stage", "e2e", "--json"]) == 0
    e2e = json.loads(capsys.readouterr().out)
    assert e2e["e2e_latency_ms"] > e2e["frame_latency_ms"] + e2e["tpot_ms"]
    header_only = tmp_path / "empty.jsonl"
    header_only.write_text(lines[0] + "\n")
    assert vrex_main(["sim", "run", "--trace", str(header_only)]) == 2
    assert "no step lines" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        lines[0] + "\n" + lines[1].replace('"selected_clusters": 3', '"selected_clusters": 99') + "\n"
    )
    assert vrex_main(["sim", "run", "--trace", str(bad)]) == 2
    assert "selected_clusters exceeds clusters" in capsys.readouterr().err


def _header_changed(tmp_path, name: str, **changes) -> Path:
    lines = TRACE.read_text().splitlines()
    header = json.loads(lines[0])
    header.update(changes)
    out = tmp_path / name
    out.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    return out


def _run_json(*argv) -> dict:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert vrex_main(["sim", "run", *argv, "--json"]) == 0
    return json.loads(buf.getvalue())


def test_a_replay_computes_in_the_systems_precision_not_the_recorded_one(tmp_path):
    """A CPU records fp32 KV; V-Rex computes in BF16 all the same. The recorded dtype only
    turns the trace's bytes into tokens, so the fetched tokens (and link bytes) agree."""
    fp32 = _header_changed(tmp_path, "fp32.jsonl", kv_dtype_bytes=4)
    bf16, f32 = _run_json("--trace", str(TRACE)), _run_json("--trace", str(fp32))
    assert bf16["model"]["dtype_bytes"] == f32["model"]["dtype_bytes"] == 2
    assert f32["frame_latency_ms"] == pytest.approx(bf16["frame_latency_ms"], rel=0.02)
    # the same bytes at 4 B per value are half the tokens, so half the link traffic
    assert f32["traffic_mb"]["link_read"] == pytest.approx(bf16["traffic_mb"]["link_read"] / 2)
    # --set wins over the trace: the recorded precision when asked for
    asked = _run_json("--trace", str(fp32), "--set", "model.dtype_bytes=4")
    assert asked["model"]["dtype_bytes"] == 4
    assert asked["traffic_mb"]["dram"] > 1.5 * f32["traffic_mb"]["dram"]  # weights and KV at 4 B
    assert asked["config_hash"] != f32["config_hash"]


def test_the_replay_takes_the_engines_device_tier_as_its_window(tmp_path):
    small = _header_changed(tmp_path, "small.jsonl", device_kv_budget_bytes=4096)
    unbounded = _header_changed(tmp_path, "unbounded.jsonl", device_kv_budget_bytes=None)
    model = json.loads(TRACE.read_text().splitlines()[0])["model"]  # recorded at 2 B per value
    per_token = 2 * model["head_dim"] * 2 * model["num_kv_heads"] * model["num_layers"]  # all layers, K and V
    assert (
        _run_json("--trace", str(small))["system_config"]["memory"]["recent_window_tokens"]
        == 4096 // per_token
    )
    assert (
        _run_json("--trace", str(unbounded))["system_config"]["memory"]["recent_window_tokens"] == 100_000_000
    )
    # without the field (older traces) the system's own window stays; --set wins over the header
    assert _run_json("--trace", str(TRACE))["system_config"]["memory"]["recent_window_tokens"] == 5000
    pinned = _run_json("--trace", str(small), "--set", "memory.recent_window_tokens=7")
    assert pinned["system_config"]["memory"]["recent_window_tokens"] == 7


def test_a_window_trace_pays_no_scoring_and_an_unknown_policy_is_refused(tmp_path, capsys):
    window = _run_json(
        "--system", "agx-orin", "--trace", str(_header_changed(tmp_path, "w.jsonl", policy="window"))
    )
    resv = _run_json("--system", "agx-orin", "--trace", str(TRACE))
    assert window["latency_breakdown_ms"]["kv_predict"] == 0 < resv["latency_breakdown_ms"]["kv_predict"]
    bogus = _header_changed(tmp_path, "b.jsonl", policy="bogus")
    assert vrex_main(["sim", "run", "--trace", str(bogus)]) == 2
    assert "policy 'bogus' is not one the engine runs" in capsys.readouterr().err


def test_the_printed_hash_follows_the_traces_content(tmp_path):
    lines = TRACE.read_text().splitlines()
    other = tmp_path / "t.jsonl"
    other.write_text("\n".join(lines) + "\n")
    first = _run_json("--trace", str(other))["config_hash"]
    other.write_text("\n".join(lines[:-1]) + "\n")
    assert _run_json("--trace", str(other))["config_hash"] != first


def test_a_replay_refuses_synthetic_scenario_flags_and_self_contradicting_traces(tmp_path, capsys):
    assert vrex_main(["sim", "run", "--trace", str(TRACE), "--kv-tokens", "9999"]) == 2
    assert "--kv-tokens does not apply to a trace replay" in capsys.readouterr().err
    lines = TRACE.read_text().splitlines()
    step = json.loads(lines[1])
    missing = dict(step, layers=step["layers"][:1])
    bad = tmp_path / "missing.jsonl"
    bad.write_text("\n".join([lines[0], json.dumps(missing)]) + "\n")
    assert vrex_main(["sim", "run", "--trace", str(bad)]) == 2
    assert "layer 1 kv_head 0 appears 0 times" in capsys.readouterr().err
    lying = dict(step, history_tokens=99999)
    bad.write_text("\n".join([lines[0], json.dumps(lying)]) + "\n")
    assert vrex_main(["sim", "run", "--trace", str(bad)]) == 2
    assert "says history_tokens 200, the step 99999" in capsys.readouterr().err


def test_trace_breakdowns_are_per_step_like_the_headline(tmp_path, capsys):
    lines = TRACE.read_text().splitlines()
    frame = next(x for x in lines[1:] if '"stage": "frame"' in x)
    three = tmp_path / "three.jsonl"
    three.write_text("\n".join([lines[0], frame, frame, frame]) + "\n")
    assert vrex_main(["sim", "run", "--trace", str(three), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert sum(rep["latency_breakdown_ms"].values()) == pytest.approx(rep["frame_latency_ms"])
    assert sum(rep["energy_breakdown_mj"].values()) == pytest.approx(rep["frame_step_energy_mj"])
    assert rep["roofline_bound_ms"] <= rep["frame_latency_ms"]
    assert rep["breakdown_of"] == "one frame step (mean of 3)" and "kv_tokens" not in rep["scenario"]
    single = tmp_path / "one.jsonl"
    single.write_text("\n".join([lines[0], frame]) + "\n")
    assert vrex_main(["sim", "run", "--trace", str(single), "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert rep["traffic_mb"] == pytest.approx(one["traffic_mb"])  # per step, like the breakdowns


def test_run_reports_busy_shares_and_traffic(capsys):
    assert vrex_main(["sim", "run", "--kv-tokens", "40000", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["utilization"]) == {"dram", "link", "offload"}
    assert all(0 < v <= 1 for v in rep["utilization"].values())
    # the vision tower's activations spill at the paper's 384 KB per core; the fetch is on the link
    assert 0 < rep["traffic_mb"]["activation_spill"] < rep["traffic_mb"]["dram"]
    assert rep["traffic_mb"]["link_read"] > 0
    assert vrex_main(["sim", "run", "--kv-tokens", "40000"]) == 0
    assert "moving data: dram" in capsys.readouterr().out
    assert vrex_main(["sim", "run", "--system", "agx-orin", "--kv-tokens", "40000", "--json"]) == 0
    gpu = json.loads(capsys.readouterr().out)
    assert gpu["utilization"] == {} and gpu["traffic_mb"]["link_read"] > rep["traffic_mb"]["link_read"]


def test_e2e_scenario_flags(capsys):
    runs = {}
    for frames in (26, 52):
        assert (
            vrex_main(
                ["sim", "run", "--stage", "e2e", "--frames", str(frames), "--kv-tokens", "5000", "--json"]
            )
            == 0
        )
        runs[frames] = json.loads(capsys.readouterr().out)
    assert runs[52]["scenario"]["frames"] == 52
    assert runs[52]["e2e_latency_ms"] > runs[26]["e2e_latency_ms"] + 20 * runs[26]["frame_latency_ms"]
    assert vrex_main(["sim", "run", "--stage", "e2e", "--answer-tokens", "-1"]) == 2
    assert "answer_tokens" in capsys.readouterr().err


def test_a_point_that_does_not_fit_in_dram_is_an_error(capsys):
    assert vrex_main(["sim", "run", "--set", "memory.dram_capacity_gb=8"]) == 2
    assert "memory.dram_capacity_gb=8 is too small" in capsys.readouterr().err
    assert vrex_main(["sim", "run", "--policy", "full", "--kv-tokens", "1000000"]) == 2
    assert "does not offload" in capsys.readouterr().err
    assert vrex_main(["sim", "run", "--system", "vrex48", "--batch", "1024"]) == 2
    assert "1024 stream(s)" in capsys.readouterr().err
    assert vrex_main(["sim", "run", "--policy", "full", "--kv-tokens", "40000"]) == 0  # 16.7 + 5.2 GB


def test_energy_per_frame_is_per_stream_at_any_batch():
    one, four = simulate("vrex8", {"kv_tokens": 5000}), simulate("vrex8", {"kv_tokens": 5000, "batch": 4})
    assert four["frame_step_energy_mj"] == pytest.approx(4 * four["energy_per_frame_mj"])
    assert four["decode_step_energy_mj"] == pytest.approx(4 * four["energy_per_token_mj"])
    # batching shares the weight stream: each stream's frame costs less than alone
    assert four["energy_per_frame_mj"] < one["energy_per_frame_mj"]


def test_layer_bandwidth_has_the_link_fetch_of_that_layer():
    res = simulate("vrex8", {"kv_tokens": 40000}, record_timeline=True)
    series = layer_bandwidth(res, 16)
    assert series["link"] and series["dram"]
    link_bytes = sum(
        nbytes for *_, nbytes, tag in res["stages"]["frame"]["timeline"]["link"] if "L16" in tag.split()
    )
    plotted = sum((end - start) * 1e-6 * gbps * 1e9 for start, end, gbps in series["link"])
    assert plotted == pytest.approx(link_bytes, rel=1e-6)
    # the SSD read the same bytes, each read starting before its link transfer
    assert sum(
        nbytes for *_, nbytes, tag in res["stages"]["frame"]["timeline"]["offload"] if "L16" in tag.split()
    ) == (pytest.approx(link_bytes))
    assert min(r[0] for r in series["offload"]) < min(r[0] for r in series["link"])


def test_sim_commands_never_import_torch():
    code = (
        "import sys; from vrex.cli import main; main(['sim', 'area', '--json']); "
        "sys.stderr.write(str('torch' in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.strip().endswith("False")


def test_validate_strict_exit_code_follows_the_rows(capsys):
    assert vrex_main(["sim", "validate", "--quick", "--json"]) == 0  # a report, whatever it says
    rows = json.loads(capsys.readouterr().out)["rows"]
    rc = vrex_main(["sim", "validate", "--quick", "--strict"])
    assert rc == (0 if all(r["pass"] for r in rows) else 1)


def test_scenario_flags_of_e2e_are_refused_elsewhere_and_policy_takes_the_papers_spelling(capsys):
    assert vrex_main(["sim", "run", "--frames", "5", "--kv-tokens", "1000"]) == 2
    assert "--frames shapes the COIN scenario of --stage e2e only" in capsys.readouterr().err
    assert vrex_main(["sim", "run", "--stage", "text", "--answer-tokens", "3", "--kv-tokens", "1000"]) == 2
    assert "--answer-tokens" in capsys.readouterr().err
    args = ["sim", "run", "--system", "agx-orin", "--policy", "InfiniGen-P", "--kv-tokens", "1000", "--json"]
    assert vrex_main(args) == 0
    assert json.loads(capsys.readouterr().out)["policy"] == "infinigen_p"


def test_batched_text_report_names_the_whole_step_and_e2e_prints_its_energy(capsys):
    assert vrex_main(["sim", "run", "--batch", "4", "--kv-tokens", "1000"]) == 0
    text = capsys.readouterr().out
    per_stream = float(text.split("energy_per_frame_mj")[1].split()[0])
    whole = float(text.split("frame_step_energy_mj")[1].split()[0])
    assert whole == pytest.approx(4 * per_stream, rel=1e-3)
    line = next(x for x in text.splitlines() if "energy breakdown of one frame step of all 4 streams" in x)
    parts = sum(float(p.split()[-1]) for p in line.split("mJ: ")[1].split(", "))
    assert parts == pytest.approx(whole, rel=1e-3)
    assert vrex_main(["sim", "run", "--stage", "e2e", "--kv-tokens", "1000", "--frames", "2"]) == 0
    assert "e2e_energy_mj" in capsys.readouterr().out
