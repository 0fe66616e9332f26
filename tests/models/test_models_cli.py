"""``vrex model info`` on a tiny checkpoint and on a bad folder."""

from __future__ import annotations

import argparse
import json

import pytest

from vrex.models.cli import register
from vrex.models.tiny import tiny_random


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vrex")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_info_json(tmp_path, capsys):
    folder = tiny_random("qwen2_5_vl", folder=tmp_path / "m")
    assert _run(["model", "info", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["family"] == "qwen2_5_vl" and report["num_kv_heads"] == 2 and not report["demo"]
    assert report["kv_bytes_per_token"] == 2 * 3 * 2 * 16 * 4


def test_info_bad_folder(tmp_path, capsys):
    with pytest.raises(ValueError, match="config.json"):  # the CLI prints it on stderr
        _run(["model", "info", str(tmp_path), "--json"])
    assert capsys.readouterr().out == ""  # nothing a JSON reader would take for a report
