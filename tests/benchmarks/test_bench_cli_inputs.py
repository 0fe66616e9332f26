"""`vrex bench ...` from a user review: flags checked before any model loads or server starts,
output paths checked before the run, strict JSON, and errors that say what to change."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import common, fidelity, latency, resv_micro, server_load
from vrex import host
from vrex.cli import main


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not load: the flags are wrong")


def _fails(capsys, argv: list[str], *needles: str) -> str:
    """Run `vrex ARGV`; it must exit 2 with one `vrex: error:` line holding every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vrex: error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


# -- 1, 2: the server the benchmark talks to


def test_local_server_that_fails_to_start_reports_its_own_error(capsys):
    err = _fails(capsys, ["bench", "server", "--model", "/nonexistent", "--seconds", "1"], "/nonexistent")
    assert "does not exist" in err and "server.log" not in err


def test_server_error_line_is_the_vrex_error_or_the_last_line():
    log = "INFO loading\nvrex: error: device 'cuda': this torch build has no CUDA\n"
    assert server_load._server_error(log) == "device 'cuda': this torch build has no CUDA"
    assert server_load._server_error("Traceback ...\n  File x\nKeyError: 'a'\n\n") == "KeyError: 'a'"
    assert server_load._server_error("") == "it printed nothing"


def test_no_server_at_the_address_is_one_line_naming_it(capsys):
    argv = ["bench", "server", "--server", "127.0.0.1:1", "--seconds", "1", "--connect-timeout", "0.5"]
    _fails(capsys, argv, "no V-Rex server answered at 127.0.0.1:1 within 0.5 s", "vrex serve", "--server")


# -- 9, 10: what the load benchmark reports and accepts


class _FakeSession:
    def __init__(self, on_ack):
        self.on_ack = on_ack

    async def send_frame(self, frame, ts):
        self.on_ack(type("Ack", (), {"round_trip_ms": 2.0, "accepted": True})())

    async def ask(self, question, max_new_tokens):
        await asyncio.sleep(0.01)
        yield "answer"


class _FakeClient:
    def __init__(self, target, api_key=None, tls_ca=None):
        pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def wait_ready(self, timeout_s):
        return None

    @contextlib.asynccontextmanager
    async def session(self, fps, on_ack, on_error):
        yield _FakeSession(on_ack)


def test_ttft_is_null_when_no_question_was_asked(monkeypatch):
    import vrex.client

    monkeypatch.setattr(vrex.client, "Client", _FakeClient)
    never = asyncio.run(server_load.run_load("fake:1", 1, 20.0, 0.2, size=(32, 32), ask_at_s=10.0))
    assert never.frames_accepted == 4 and never.ttft_p50_ms is None and never.ttft_max_ms is None
    assert "TTFT p50 n/a" in server_load._line(never)
    asked = asyncio.run(server_load.run_load("fake:1", 1, 20.0, 0.2, size=(32, 32), ask_at_s=0.0))
    assert asked.ttft_p50_ms is not None and asked.ttft_p50_ms > 0
    assert "TTFT p50 n/a" not in server_load._line(asked)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--sweep", "--max-streams", "0"], "--max-streams must be >= 1"),
        (["--streams", "0"], "--streams must be >= 1"),
        (["--size", "abc"], "--size"),
        (["--fps", "1000"], "--fps must be in (0, 120]"),
        (["--ask-at", "-1"], "--ask-at"),
        (["--connect-timeout", "0"], "--connect-timeout"),
    ],
)
def test_load_flags_are_checked_before_a_server_starts(capsys, monkeypatch, flags, needle):
    monkeypatch.setattr(server_load, "_LocalServer", _no_model)
    _fails(capsys, ["bench", "server", *flags], needle)


# -- 3: fidelity trials


@pytest.mark.parametrize("flag", ["--trials", "--default-trials"])
def test_fidelity_zero_trials_is_refused_not_the_default(capsys, monkeypatch, flag):
    monkeypatch.setattr(fidelity, "Engine", _no_model)
    _fails(capsys, ["bench", "fidelity", "--part", "needle", flag, "0"], f"{flag} must be >= 1, got 0")


def test_fidelity_video_takes_files_and_says_when_missing(capsys, monkeypatch):
    monkeypatch.setattr(fidelity, "Engine", _no_model)
    _fails(capsys, ["bench", "fidelity", "--part", "video", "--video", "./nope.mp4"], "video file not found")


# -- 4: output paths checked before the run


def test_check_output_path(tmp_path):
    host.check_output_path(None, "--out")
    host.check_output_path(str(tmp_path / "new" / "deeper" / "r.json"), "--out")  # can be created
    host.check_output_path(str(tmp_path / "data"), "--data-dir", folder=True)
    with pytest.raises(ValueError, match="--out .*: is a folder"):
        host.check_output_path(str(tmp_path), "--out")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="--raw .*is a file, not a folder"):
        host.check_output_path(str(blocker / "r.jsonl"), "--raw")
    with pytest.raises(ValueError, match="--data-dir .*: is a file, not a folder"):
        host.check_output_path(str(blocker), "--data-dir", folder=True)
    host.write_text(tmp_path / "a" / "b" / "r.json", "{}")
    assert (tmp_path / "a" / "b" / "r.json").read_text() == "{}"


def test_resv_out_is_checked_before_the_run(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(resv_micro, "run_benchmark", _no_model)
    _fails(capsys, ["bench", "resv", "--quick", "--out", str(tmp_path)], "--out", "is a folder")
    (tmp_path / "f").write_text("")
    _fails(capsys, ["bench", "resv", "--quick", "--out", str(tmp_path / "f" / "r.json")], "--out")


@pytest.mark.parametrize("flag", ["--out", "--raw", "--data-dir", "--record-cache"])
def test_latency_outputs_are_checked_before_the_model_loads(capsys, monkeypatch, tmp_path, flag):
    monkeypatch.setattr(latency, "Engine", _no_model)
    (tmp_path / "f").write_text("")
    _fails(capsys, ["bench", "latency", flag, str(tmp_path / "f" / "x")], flag, "is a file, not a folder")


@pytest.mark.parametrize("flag", ["--out", "--raw", "--plot"])
def test_fidelity_outputs_are_checked_before_the_model_loads(capsys, monkeypatch, tmp_path, flag):
    monkeypatch.setattr(fidelity, "Engine", _no_model)
    argv = ["bench", "fidelity", "--part", "budget", flag, str(tmp_path)]
    _fails(capsys, argv, flag, "is a folder")


def test_wal_data_dir_is_checked_before_the_model_loads(capsys, tmp_path):
    (tmp_path / "f").write_text("")
    _fails(capsys, ["bench", "wal", "--data-dir", str(tmp_path / "f")], "--data-dir", "is a file")


def test_emit_creates_the_out_folder(tmp_path, capsys):
    out = tmp_path / "new" / "rows.json"
    common.emit([{"a": 1}], ["a"], False, str(out))
    assert json.loads(out.read_text()) == [{"a": 1}]


# -- 8: strict JSON


def test_json_output_has_null_not_nan(capsys, tmp_path):
    rows = [{"x": float("nan"), "y": [float("inf"), 1.5], "z": {"w": float("-inf")}}]
    common.emit(rows, ["x"], True)
    assert _strict_json(capsys.readouterr().out) == [{"x": None, "y": [None, 1.5], "z": {"w": None}}]
    # end to end: full attention missed the only trial, so ReSV's accuracy is NaN
    raw = tmp_path / "a.jsonl"
    trial = {"seed": 0, "trial": 0, "history": 2048, "depth_bin": 0, "bytes_fetched": 1}
    fractions = {k: 1.0 for k in ("frame", "text", "decode", "answer")}
    lines = [
        {**trial, **{f"fetched_fraction_{k}": v for k, v in fractions.items()}, "policy": p, "found": False}
        for p in ("full", "resv")
    ]
    raw.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["bench", "fidelity", "--merge-raw", str(raw), "--json"]) == 0
    rows = _strict_json(capsys.readouterr().out)
    resv_row = next(r for r in rows if r.get("policy") == "resv")
    assert resv_row["accuracy"] is None


def test_needle_raw_files_with_nulls_merge():
    raw = [{"policy": "full", "seed": 0, "trial": 0, "history": 256, "depth_bin": 0, "found": True,
            "fetched_fraction_frame": None, "fetched_fraction_text": 1.0, "fetched_fraction_decode": 1.0,
            "fetched_fraction_answer": 1.0, "bytes_fetched": 5}]  # fmt: skip
    (row,) = fidelity.summarize_needle(raw, ["full"])
    assert row["accuracy"] == 1.0 and row["fetched_fraction_frame"] != row["fetched_fraction_frame"]


# -- 11: sizes and counts


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--history", "0"], "--history must be >= 137 tokens for shape smollm2"),
        (["--shape", "llama3-8b", "--history", "28"], "--history must be >= 29 tokens for shape llama3-8b"),
    ],
)
def test_resv_history_below_its_minimum(capsys, monkeypatch, flags, needle):
    monkeypatch.setattr(resv_micro, "run_benchmark", _no_model)
    _fails(capsys, ["bench", "resv", *flags], needle)


def test_the_bench_parsers_copies_match_their_sources():
    # benchmarks.cli keeps copies so that `vrex bench --help` does not import torch
    from benchmarks import cli as bench_cli
    from vrex.engine import EngineConfig

    assert sorted(bench_cli.RESV_SHAPES) == sorted(resv_micro.SHAPES)
    assert bench_cli.ENGINE_BLOCK_TOKENS == EngineConfig.block_tokens


def test_resv_runs_at_its_minimum_history():
    shape = resv_micro.SHAPES["llama3-8b"]
    rows = resv_micro.measure(shape, resv_micro.min_history(shape), rows=10, needles=8, repeats=1, seed=0)
    assert rows and all(r["history_tokens"] == 29 for r in rows)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--history", "0"], "--history must be >= 1"),
        (["--steps", "1"], "--steps must be >= 2"),
        (["--steps", "0"], "--steps must be >= 2"),
        (["--device-fraction", "2"], "--device-fraction must be in [0, 1]"),
        (["--device-fraction", "-1"], "--device-fraction must be in [0, 1]"),
        (["--host-fraction", "1.5"], "--host-fraction must be in [0, 1]"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--record-fps", "0"], "--record-fps"),
        (["--block-tokens", "8", "--block-tokens", "0"], "--block-tokens must be >= 1"),
    ],
)
def test_latency_flags_are_checked_before_the_model_loads(capsys, monkeypatch, flags, needle):
    monkeypatch.setattr(latency, "Engine", _no_model)
    _fails(capsys, ["bench", "latency", *flags], needle)


def test_latency_device_cuda_without_cuda_is_friendly(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(latency, "Engine", _no_model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails(capsys, ["bench", "latency", "--device", "cuda"], "use --device cpu")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--size", "abc"], "--size must be WIDTHxHEIGHT"),
        (["--size", "2x2"], "--size"),
        (["--at", "a,b"], "--at must be comma-separated"),
        (["--at", "20"], "--at value must be in 1..--frames (12)"),
        (["--frames", "0"], "--frames must be >= 1"),
    ],
)
def test_wal_flags_name_themselves(capsys, flags, needle):
    _fails(capsys, ["bench", "wal", *flags], needle)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--chunk-tokens", "0"], "--chunk-tokens must be >= 1"),
        (["--history", "10"], "--history must be >= 128"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--fps", "0"], "--fps must be in (0, 120]"),
    ],
)
def test_fidelity_flags_are_checked_before_the_model_loads(capsys, monkeypatch, flags, needle):
    monkeypatch.setattr(fidelity, "Engine", _no_model)
    _fails(capsys, ["bench", "fidelity", "--part", "needle", *flags], needle)


def test_latency_history_shorter_than_the_measured_steps(monkeypatch):
    class Step:
        num_tokens = 64

    monkeypatch.setattr(latency, "frame_steps", lambda adapter, count: [Step()] * count)
    args = type("Args", (), {"history": [100], "quick": False, "policy": None, "steps": 2})()
    with pytest.raises(ValueError, match=r"--history must be >= 128 tokens with --steps 2"):
        latency.run(args, adapter=object())


# -- 15: the commit of the package's checkout, from any folder


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_machine_commit_is_the_packages_wherever_it_runs(tmp_path, monkeypatch):
    root = Path(host.__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the package is not in a git checkout here")
    monkeypatch.chdir(tmp_path)
    assert host.machine_info()["commit"] == head.stdout.strip()
    assert host.package_commit(tmp_path) == ""  # not a checkout
    # a package folder inside someone else's repository is not that repository's commit
    other = tmp_path / "other"
    (other / "site").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    # with a commit, so that HEAD resolves and only the toplevel comparison can say ""
    ident = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", *ident, "-C", str(other), "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    assert host.package_commit(other / "site") == ""
