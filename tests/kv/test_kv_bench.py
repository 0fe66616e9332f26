import argparse
import json

import torch

from vrex.kv import TierBudgets, TieredKVStore
from vrex.kv.cli import register

torch.set_num_threads(1)


def test_kv_bench_cli_json(capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "kv-bench",
            "--tokens",
            "2048",
            "--kv-heads",
            "2",
            "--head-dim",
            "8",
            "--block-tokens",
            "4",
            "--repeats",
            "1",
            "--json",
        ]
    )
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["tiers"]) == {"device", "host", "disk"}
    assert report["tiers"]["device"]["share_from_tier"] == 1.0
    for tier in ("host", "disk"):
        assert report["tiers"][tier]["share_from_tier"] > 0.7
    for row in report["tiers"].values():
        assert row["bytes_per_fetch"] == row["tokens_per_fetch"] * 2 * 8 * 2 and row["gb_per_s"] > 0


def test_prefetch_stays_correct_while_appends_evict(tmp_path):
    gen = torch.Generator().manual_seed(7)
    block_bytes = 2 * 2 * 4 * 4
    store = TieredKVStore(
        2,
        1,
        4,
        budgets=TierBudgets(device_bytes=8 * block_bytes, host_bytes=4 * block_bytes, disk_dir=tmp_path),
        block_tokens=2,
    )
    history = []
    for step in range(40):
        keys = torch.randn(1, 2, 4, generator=gen)
        store.append(1, keys, keys * 2, torch.tensor([[step, step]]))
        history.append(keys)
    want = torch.cat(history, 1)
    positions = [torch.arange(79, -1, -1)]
    handles = []
    for step in range(30):
        handles.append(store.prefetch(1, positions))
        keys = torch.randn(1, 3, 4, generator=gen)
        store.append(
            0, keys, keys, torch.tensor([[step, 100 + step, 200 + step]])
        )  # moves layer 1 blocks down
    for handle in handles:
        result = store.fetch(1, positions, handle)
        assert torch.equal(result.keys[0], want[0].flip(0)) and torch.equal(
            result.values[0], 2 * want[0].flip(0)
        )
    assert store.stats()["resident_tokens_device"] <= 8 * 2
    store.close()
