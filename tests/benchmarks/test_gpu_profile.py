"""`benchmarks/gpu_profile.py` on CPU with a tiny model: one line per setup and its tables."""

from __future__ import annotations

import pytest

from benchmarks import gpu_profile


def test_profile_writes_a_table_per_setup(tmp_path, capsys):
    from vrex.models import tiny_random
    from vrex.video import sample_video

    try:
        video = sample_video("bikes.mp4")
    except FileNotFoundError as exc:
        pytest.skip(f"sample video missing: {exc}")
    model = tiny_random("smolvlm", folder=tmp_path / "m")
    assert (
        gpu_profile.main(
            ["--device", "cpu", "--model", str(model), "--video", str(video), "--out", str(tmp_path / "p")]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [tag for tag, _, _ in gpu_profile.SETUPS]
    assert "fetched 1.000" in lines[0] and "fetched 1.000" in lines[1]
    for tag, _, _ in gpu_profile.SETUPS:
        text = (tmp_path / "p" / f"prof-{tag}.txt").read_text()
        assert text.startswith("aten calls per step") and "aten::" in text
