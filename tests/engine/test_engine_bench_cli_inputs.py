"""`vrex engine-bench`, `vrex codesign` and `vrex model` from a user review: flags and videos
checked before the model loads; errors as one `vrex: error:` line on stderr."""

from __future__ import annotations

import shutil

import pytest

import vrex.codesign as codesign
import vrex.engine
import vrex.engine.bench as engine_bench
from vrex.cli import main


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not load: the flags are wrong")


def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    out = capsys.readouterr()
    err = out.err.strip()
    assert err.startswith("vrex: error: ") and "\n" not in err, err
    assert out.out == ""  # stdout stays clean (for --json readers)
    for needle in needles:
        assert needle in err, err
    return err


def _sample_or_skip(name: str):
    from vrex.video import sample_video

    try:
        return sample_video(name)
    except FileNotFoundError:
        pytest.skip(f"sample {name} not installed (scripts/fetch_assets.sh)")


# -- 5: engine-bench counts


@pytest.mark.parametrize("what", ["phases", "batch"])
@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--frames", "0"], "--frames must be >= 1, got 0"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--warm-frames", "-1"], "--warm-frames must be >= 0, got -1"),
        (["--sessions", "0"], "--sessions must be >= 1, got 0"),
    ],
)
def test_engine_bench_counts_are_checked_before_the_model_loads(capsys, monkeypatch, what, flags, needle):
    monkeypatch.setattr(vrex.engine, "Engine", _no_model)  # _run imports it from there
    _fails(capsys, ["engine-bench", what, *flags], needle)


# -- 7: video files and sample names


def test_engine_bench_video_takes_a_file_or_a_sample_name(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(vrex.engine, "Engine", _no_model)
    _fails(capsys, ["engine-bench", "phases", "--video", str(tmp_path / "nope.mp4")], "video file not found")
    clip = tmp_path / "clip.mp4"
    shutil.copy(_sample_or_skip("bikes.mp4"), clip)
    assert len(engine_bench._frames(str(clip), 2)) == 2
    assert len(engine_bench._frames("bikes", 1)) == 1


def test_engine_bench_help_says_it_takes_files(capsys):
    with pytest.raises(SystemExit):
        main(["engine-bench", "--help"])
    assert "video file, or a sample name" in capsys.readouterr().out


def test_codesign_missing_video_file_says_not_found(capsys, monkeypatch):
    monkeypatch.setattr(codesign, "run_codesign", _no_model)
    _fails(capsys, ["codesign", "--video", "./nope.mp4"], "video file not found: ./nope.mp4")


# -- 4, 11: codesign flags and its --trace


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--max-seconds", "-1"], "--max-seconds must be a positive number of seconds"),
        (["--max-seconds", "0"], "--max-seconds"),
        (["--fps", "0"], "--fps must be in (0, 120]"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--device-kv-budget", "lots"], "--device-kv-budget"),
        (["--system", "agx-orin"], "--system"),
        (["--baseline", "nope"], "unknown system 'nope'"),
    ],
)
def test_codesign_flags_are_checked_before_streaming(capsys, monkeypatch, flags, needle):
    monkeypatch.setattr(codesign, "run_codesign", _no_model)
    _sample_or_skip("bikes.mp4")
    _fails(capsys, ["codesign", "--video", "bikes.mp4", *flags], needle)


def test_codesign_trace_path_is_checked_before_streaming(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(codesign, "run_codesign", _no_model)
    _sample_or_skip("bikes.mp4")
    _fails(capsys, ["codesign", "--video", "bikes.mp4", "--trace", str(tmp_path)], "--trace", "is a folder")


# -- 13: model errors on stderr, also with --json


def test_model_info_errors_go_to_stderr_also_with_json(capsys, tmp_path):
    _fails(capsys, ["model", "info", str(tmp_path), "--json"], "config.json")
    _fails(capsys, ["model", "info", "/nonexistent", "--json"])


def test_model_prepare_demo_cache_dir_is_checked(capsys, tmp_path):
    (tmp_path / "f").write_text("")
    _fails(capsys, ["model", "prepare-demo", "--cache-dir", str(tmp_path / "f"), "--json"], "--cache-dir")
