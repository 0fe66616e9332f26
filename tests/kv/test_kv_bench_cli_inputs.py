"""`vrex kv-bench` from a user review: a friendly --device message, and no rows that time the
wrong tier."""

from __future__ import annotations

import pytest
import torch

from vrex.cli import main
from vrex.kv.bench import KVBenchConfig, measure_fetch_throughput

TINY = ["--kv-heads", "2", "--head-dim", "8", "--repeats", "1"]


def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    out = capsys.readouterr()
    err = out.err.strip()
    assert err.startswith("vrex: error: ") and "\n" not in err and out.out == "", out
    for needle in needles:
        assert needle in err, err
    return err


def test_cuda_without_cuda_says_what_to_do(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails(capsys, ["kv-bench", "--device", "cuda", *TINY], "device 'cuda'", "use --device cpu")


def test_history_too_short_for_the_lower_tiers_is_refused(capsys):
    # the host and disk runs keep (64 + 1) blocks of 16 tokens per head on the device
    _fails(capsys, ["kv-bench", "--tokens", "512", *TINY], "--tokens must be >= 4160", "--append-tokens 64")
    with pytest.raises(ValueError, match="--tokens must be >= 4160"):
        measure_fetch_throughput(KVBenchConfig(history_tokens=512, num_kv_heads=2, head_dim=8, repeats=1))


def test_at_the_minimum_every_row_times_its_own_tier():
    from vrex.kv.bench import min_history_tokens

    config = KVBenchConfig(num_kv_heads=2, head_dim=8, block_tokens=4, append_tokens=8, repeats=1)
    config = KVBenchConfig(**{**config.__dict__, "history_tokens": min_history_tokens(config)})
    tiers = measure_fetch_throughput(config)["tiers"]
    assert tiers["device"]["share_from_tier"] == 1.0
    assert all(tiers[t]["share_from_tier"] > 0.6 for t in ("host", "disk")), tiers


@pytest.mark.parametrize("flag", ["--tokens", "--repeats", "--kv-heads"])
def test_counts_name_their_flag(capsys, flag):
    _fails(capsys, ["kv-bench", flag, "0"], f"{flag} must be >= 1, got 0")
