"""Snapshot / restore of the tiered KV store: bit-exact, checksummed, atomic."""

import json
import os

import numpy as np
import pytest
import torch

from vrex.kv import SnapshotError, TierBudgets, TieredKVStore
from vrex.kv import snapshot as snapshot_module
from vrex.kv import store as store_module

torch.set_num_threads(1)


def _filled_store(tmp_path, steps=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    block_bytes = 4 * 2 * 4 * 2  # bf16
    budgets = TierBudgets(
        device_bytes=12 * block_bytes, host_bytes=10 * block_bytes, disk_dir=tmp_path / "disk"
    )
    store = TieredKVStore(2, 2, 4, dtype=torch.bfloat16, budgets=budgets, block_tokens=4)
    for step in range(steps):
        for layer in range(2):
            keys = torch.randn(2, 2, 4, generator=gen).bfloat16()
            values = torch.randn(2, 2, 4, generator=gen).bfloat16()
            ids = torch.randint(0, 6, (2, 2), generator=gen) + (step // 4) * 6
            store.append(layer, keys, values, ids)
    store.fetch(0, [torch.tensor([0, 5]), torch.tensor([2 * steps - 1])])
    return store


def _assert_same(a, b):
    assert a.stats() == b.stats()
    for layer in range(a.num_layers):
        assert a.length(layer) == b.length(layer)
        assert torch.equal(a.tier_of(layer), b.tier_of(layer))
        ka, va = a.fetch_all(layer)
        kb, vb = b.fetch_all(layer)
        assert torch.equal(ka.view(torch.int16), kb.view(torch.int16))
        assert torch.equal(va.view(torch.int16), vb.view(torch.int16))
        for head in range(a.num_kv_heads):
            ca, cb = a.cluster_tier(layer, head), b.cluster_tier(layer, head)
            assert torch.equal(ca.cluster_ids, cb.cluster_ids) and torch.equal(ca.tiers, cb.tiers)


def test_round_trip_is_bit_exact_and_continues_identically(tmp_path):
    store = _filled_store(tmp_path)
    stats = store.stats()
    assert stats["resident_tokens_disk"] > 0 and stats["resident_tokens_host"] > 0
    store.snapshot(tmp_path / "snap")
    manifest = json.loads((tmp_path / "snap" / "manifest.json").read_text())
    assert "disk_layer000.bin" in manifest["files"] and "device_arena.bin" in manifest["files"]
    restored = TieredKVStore.restore(tmp_path / "snap", disk_dir=tmp_path / "disk2")
    assert restored.disk_folder.parent == tmp_path / "disk2"
    _assert_same(store, restored)
    # both keep streaming the same way: same placement, same counters, same data
    gen = torch.Generator().manual_seed(9)
    for step in range(30):
        keys = torch.randn(2, 3, 4, generator=gen).bfloat16()
        ids = torch.randint(0, 200, (2, 3), generator=gen)
        for s in (store, restored):
            s.append(step % 2, keys, -keys, ids)
    _assert_same(store, restored)
    store.close()
    restored.close()


def test_snapshot_replaces_previous_and_leaves_no_temp(tmp_path):
    store = _filled_store(tmp_path, steps=10)
    store.snapshot(tmp_path / "snap")
    store.append(
        0,
        torch.zeros(2, 1, 4).bfloat16(),
        torch.zeros(2, 1, 4).bfloat16(),
        torch.zeros(2, 1, dtype=torch.long),
    )
    store.snapshot(tmp_path / "snap")
    assert TieredKVStore.restore(tmp_path / "snap").length(0) == store.length(0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "snap"]


@pytest.mark.parametrize("victim", ["device_arena.bin", "disk_layer001.bin", "tables.npz", "meta.json"])
def test_corrupted_file_is_detected(tmp_path, victim):
    store = _filled_store(tmp_path)
    store.snapshot(tmp_path / "snap")
    path = tmp_path / "snap" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=f"checksum of {victim}"):
        TieredKVStore.restore(tmp_path / "snap")


def test_missing_file_and_missing_manifest(tmp_path):
    store = _filled_store(tmp_path, steps=5)
    store.snapshot(tmp_path / "snap")
    os.remove(tmp_path / "snap" / "host_arena.bin")
    with pytest.raises(SnapshotError, match="host_arena.bin is missing"):
        TieredKVStore.restore(tmp_path / "snap")
    os.remove(tmp_path / "snap" / "manifest.json")
    with pytest.raises(SnapshotError, match="manifest.json is missing"):
        TieredKVStore.restore(tmp_path / "snap")
    with pytest.raises(SnapshotError, match="no snapshot"):
        TieredKVStore.restore(tmp_path / "nowhere")


def test_interrupted_snapshot_keeps_previous(tmp_path, monkeypatch):
    store = _filled_store(tmp_path)
    store.snapshot(tmp_path / "snap")
    before = (tmp_path / "snap" / "manifest.json").read_text()
    expected_length = store.length(1)
    store.append(
        1, torch.ones(2, 1, 4).bfloat16(), torch.ones(2, 1, 4).bfloat16(), torch.zeros(2, 1, dtype=torch.long)
    )

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store_module.np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        store.snapshot(tmp_path / "snap")
    monkeypatch.undo()
    assert (tmp_path / "snap" / "manifest.json").read_text() == before
    assert not list(tmp_path.glob(".snap.tmp-*"))
    # a temp folder left by a killed process is ignored too
    (tmp_path / ".snap.tmp-deadbeef").mkdir()
    (tmp_path / ".snap.tmp-deadbeef" / "meta.json").write_text("{half")
    assert TieredKVStore.restore(tmp_path / "snap").length(1) == expected_length


def test_crash_between_renames_restores_set_aside_copy(tmp_path, monkeypatch):
    store = _filled_store(tmp_path, steps=8)
    store.snapshot(tmp_path / "snap")
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old snapshot is set aside, the new one never arrives
            raise OSError("power cut")
        real_rename(src, dst)

    monkeypatch.setattr(snapshot_module.os, "rename", rename)
    expected_length = store.length(0)
    store.append(
        0, torch.ones(2, 1, 4).bfloat16(), torch.ones(2, 1, 4).bfloat16(), torch.zeros(2, 1, dtype=torch.long)
    )
    with pytest.raises(OSError, match="power cut"):
        store.snapshot(tmp_path / "snap")
    monkeypatch.undo()
    assert not (tmp_path / "snap").exists()
    restored = TieredKVStore.restore(tmp_path / "snap")
    assert restored.length(0) == expected_length == store.length(0) - 1


def test_numpy_bits_helpers_are_exact():
    from vrex.kv.arena import from_numpy_bits, to_numpy_bits

    values = torch.tensor([1.5, -0.0, float("nan"), 3e38], dtype=torch.float32).bfloat16()
    bits = to_numpy_bits(values)
    assert bits.dtype == np.int16
    assert torch.equal(from_numpy_bits(bits, torch.bfloat16).view(torch.int16), values.view(torch.int16))


def test_empty_store_round_trip_then_append(tmp_path):
    store = TieredKVStore(3, 2, 4, budgets=TierBudgets(device_bytes="4KiB"), block_tokens=2)
    store.snapshot(tmp_path / "snap")
    restored = TieredKVStore.restore(tmp_path / "snap")
    assert restored.budgets == store.budgets and restored.stats() == store.stats()
    keys = torch.ones(2, 3, 4)
    restored.append(2, keys, keys, torch.tensor([[1, 1, 2], [0, 0, 0]]))
    assert torch.equal(restored.fetch_all(2)[0], keys)
    assert restored.cluster_tier(2, 0).cluster_ids.tolist() == [1, 2]
