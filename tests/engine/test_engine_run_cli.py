"""`vrex run`: flags checked before the model loads, --video paths vs sample names, help text,
and damaged videos answered from the frames that decode."""

from __future__ import annotations

import json

import numpy as np
import pytest

import vrex.engine
from vrex.cli import main
from vrex.engine import cli as run_cli


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if `vrex run` gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(vrex.engine, "Engine", refuse)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--max-seconds", "-1"), "--max-seconds must be a positive number of seconds, got -1"),
        (("--max-seconds", "0"), "--max-seconds must be a positive"),
        (("--ask-at", "-3"), "--ask-at must be >= 0 seconds of video, got -3"),
        (("--fps", "0"), "--fps must be in (0, 120] frames per second, got 0"),
        (("--fps", "121"), "--fps must be in (0, 120]"),
        (("--max-new-tokens", "-5"), "--max-new-tokens must be in 1..4096, got -5"),
        (("--max-new-tokens", "0"), "--max-new-tokens must be in 1..4096"),
    ],
)
def test_bad_flags_fail_before_the_model_loads(no_model, tmp_path, capsys, flags, message):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")  # never opened: the flags are checked first
    assert main(["run", "--video", str(clip), "--ask", "what?", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vrex: error: ") and message in err


def test_a_trace_path_that_cannot_be_written_is_named(no_model, tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")  # never opened: the flags are checked first
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for trace, message in ((blocker / "t.jsonl", "is a file, not a folder"), (tmp_path, "is a folder")):
        assert main(["run", "--video", str(clip), "--ask", "what?", "--trace", str(trace)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vrex: error: --trace ") and message in err


def test_unknown_preset_names_the_choices(no_model, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--video", "x.mp4", "--ask", "what?", "--preset", "bogus"])
    assert exc.value.code == 2
    assert "invalid choice: 'bogus' (choose from 'default', 'paper')" in capsys.readouterr().err


def test_a_missing_path_is_not_called_an_unknown_sample(no_model, tmp_path, capsys):
    assert main(["run", "--video", str(tmp_path / "x" / "nope.mp4"), "--ask", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"video file not found: {tmp_path / 'x' / 'nope.mp4'}" in err and "unknown sample" not in err


def test_the_flags_limits_are_the_engines():
    from vrex.engine import SessionSettings
    from vrex.limits import RESV_PRESETS  # what run's --preset offers (limits.add_preset_flag)
    from vrex.resv import POLICIES, PRESETS

    assert set(RESV_PRESETS) == set(PRESETS) and set(run_cli.POLICIES) == set(POLICIES)
    SessionSettings(fps=run_cli.MAX_FPS, max_new_tokens=run_cli.MAX_NEW_TOKENS)
    with pytest.raises(ValueError):
        SessionSettings(fps=run_cli.MAX_FPS * 1.01)
    with pytest.raises(ValueError):
        SessionSettings(max_new_tokens=run_cli.MAX_NEW_TOKENS + 1)


def test_damaged_videos_still_get_their_answers(tiny_smolvlm_dir, tmp_path, capsys, write_clip):
    data = write_clip(tmp_path / "clip.mp4")
    middle = len(data) // 2
    (tmp_path / "corrupt.mp4").write_bytes(
        data[:middle] + np.random.default_rng(1).bytes(2000) + data[middle + 2000 :]
    )
    (tmp_path / "cut.mp4").write_bytes(data[:middle])
    for name, warning in (("corrupt.mp4", "undecodable data after"), ("cut.mp4", "of its declared 8.0 s")):
        args = ["run", "--video", str(tmp_path / name), "--model", str(tiny_smolvlm_dir), "--fps", "1"]
        assert main([*args, "--ask", "what?", "--max-new-tokens", "2", "--json"]) == 0
        captured = capsys.readouterr()
        assert captured.err.count("vrex run: warning: ") == 1 and warning in captured.err
        out = json.loads(captured.out)
        assert len(out["answers"]) == 1 and out["stats"]["frames_accepted"] >= 3


def test_the_first_ctrl_c_ends_the_video_and_still_answers(tiny_smolvlm_dir, tmp_path, write_clip):
    """It quit with exit code 130 and printed nothing: no answer, no stats."""
    import signal
    import subprocess
    import sys

    write_clip(tmp_path / "long.mp4", seconds=60, fps=2)
    args = ["run", "--video", str(tmp_path / "long.mp4"), "--model", str(tiny_smolvlm_dir), "--fps", "2"]
    args += ["--ask", "what?", "--ask-at", "55", "--max-new-tokens", "2"]
    # Ctrl-C as at a terminal, also where this test runs as a background job (SIGINT ignored)
    child = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from vrex.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        progress = 0
        while progress < 3:  # off a terminal, one progress line per frame kept
            line = proc.stderr.readline()
            assert line, "the run ended before it streamed three frames"
            progress += "frames" in line and "kept" in line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "interrupted: the video ends after this frame" in err
    assert "Q: what?" in out and "stats" in out
    kept = int(out.split("frames_accepted")[1].split()[0].replace(",", ""))
    assert 3 <= kept < 110  # stopped early, and the frame in progress was kept whole
