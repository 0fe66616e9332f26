"""Tiered KV store: placement, eviction, byte counting, fetch, prefetch, bad input."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vrex.kv import DEVICE, DISK, HOST, TierBudgets, TieredKVStore
from vrex.kv import store as store_module
from vrex.kv.arena import MemoryArena

torch.set_num_threads(1)


class Reference:
    """A plain copy of everything appended, per layer, to check the store against."""

    def __init__(self, num_layers):
        self.keys = [[] for _ in range(num_layers)]
        self.values = [[] for _ in range(num_layers)]

    def append(self, layer, keys, values):
        self.keys[layer].append(keys.clone())
        self.values[layer].append(values.clone())

    def all(self, layer):
        return torch.cat(self.keys[layer], 1), torch.cat(self.values[layer], 1)


def _kv(num_heads, num_tokens, head_dim, generator, dtype=torch.float32):
    keys = torch.randn(num_heads, num_tokens, head_dim, generator=generator).to(dtype)
    values = torch.randn(num_heads, num_tokens, head_dim, generator=generator).to(dtype)
    return keys, values


# ---------------------------------------------------------------------------- hand-checked case


def _hand_store(tmp_path):
    # head_dim 2, fp32 -> one token of one head is K+V = 2*2*4 = 16 B; a block of 2 tokens is 32 B.
    budgets = TierBudgets(device_bytes=64, host_bytes=32, disk_dir=tmp_path)
    store = TieredKVStore(1, 1, 2, budgets=budgets, block_tokens=2)
    keys = torch.arange(7 * 2, dtype=torch.float32).view(1, 7, 2)
    values = -keys
    steps = [([0, 0, 1], 0), ([2], 3), ([1], 4), ([3, 3], 5)]
    for ids, start in steps:
        end = start + len(ids)
        store.append(0, keys[:, start:end], values[:, start:end], torch.tensor([ids]))
    return store, keys, values


def test_hand_case_tiers_and_counters(tmp_path):
    store, keys, values = _hand_store(tmp_path)
    # step 1: cluster 0 -> block A (2 tokens), cluster 1 -> block B; device holds 2 blocks (full)
    # step 2: new cluster 2 needs a block: oldest (cluster 0, block A) moves to host
    # step 3: cluster 1 still has room in block B on the device: no new block, nothing moves
    # step 4: cluster 3 needs a block: cluster 2's block C moves to host, pushing A to disk
    assert store.tier_of(0).tolist() == [[DISK, DISK, DEVICE, HOST, DEVICE, DEVICE, DEVICE]]
    stats = store.stats()
    assert stats["appended_bytes"] == 7 * 16
    assert stats["evicted_bytes_device_to_host"] == 2 * 32
    assert stats["evicted_bytes_host_to_disk"] == 32
    assert stats["evicted_bytes_device_to_disk"] == 0
    assert (stats["resident_blocks_device"], stats["resident_tokens_device"]) == (2, 4)
    assert (stats["resident_blocks_host"], stats["resident_tokens_host"]) == (1, 1)
    assert (stats["resident_blocks_disk"], stats["resident_tokens_disk"]) == (1, 2)
    assert stats["resident_bytes_device"] == 64
    assert stats["peak_resident_bytes_device"] == 64
    assert (stats["fill_fraction_device"], stats["fill_fraction_host"], stats["fill_fraction_disk"]) == (
        1.0,
        0.5,
        1.0,
    )

    result = store.fetch(0, [torch.tensor([6, 0, 3])])
    assert (result.bytes_device, result.bytes_host, result.bytes_disk) == (16, 16, 16)
    assert torch.equal(result.keys[0], keys[0, [6, 0, 3]])
    assert torch.equal(result.values[0], values[0, [6, 0, 3]])
    stats = store.stats()
    assert (stats["fetched_bytes_device"], stats["fetched_bytes_host"], stats["fetched_bytes_disk"]) == (
        16,
        16,
        16,
    )

    tiers = store.cluster_tier(0, 0)
    assert tiers.cluster_ids.tolist() == [0, 1, 2, 3]
    assert tiers.tiers.tolist() == [DISK, DEVICE, HOST, DEVICE]
    assert tiers.off_device().tolist() == [0, 2]
    assert store.positions_of_clusters(0, 0, torch.tensor([1, 3])).tolist() == [2, 4, 5, 6]
    assert store.disk_folder is not None and store.disk_folder.parent == tmp_path
    store.close()
    assert not store.disk_folder.exists()


def test_cluster_pages_are_contiguous():
    store = TieredKVStore(1, 1, 2, block_tokens=4)
    ids = torch.tensor([[5, 9, 5, 9, 5, 7, 5, 5]])
    keys = torch.arange(16, dtype=torch.float32).view(1, 8, 2)
    store.append(0, keys, keys, ids)
    # cluster 5 has 5 tokens -> 2 blocks, its first 4 tokens fill one block in arrival order
    block = store._pos_block[0][0, :8]
    offset = store._pos_offset[0][0, :8]
    c5 = [0, 2, 4, 6, 7]
    assert len(set(block[c5[:4]].tolist())) == 1 and offset[c5[:4]].tolist() == [0, 1, 2, 3]
    assert block[7] != block[0] and offset[7] == 0
    assert block[1] == block[3] and block[1] != block[0] and block[5] not in (block[0], block[1], block[7])
    assert store.stats()["num_blocks"] == 4


def test_full_tier_frees_a_32nd_beyond_the_append_oldest_first(tmp_path):
    # 64 device blocks of one token; 64 singleton clusters fill the tier. The next new cluster
    # needs one block: the tier frees 1 + 64 // 32 = 3, the three oldest, so the scan for the
    # oldest blocks runs once per 3 appends here rather than at each.
    store = TieredKVStore(
        1, 1, 2, budgets=TierBudgets(device_bytes=64 * 16, disk_dir=tmp_path), block_tokens=1
    )
    keys = torch.arange(67 * 2, dtype=torch.float32).view(1, 67, 2)
    for t in range(64):
        store.append(0, keys[:, t : t + 1], -keys[:, t : t + 1], torch.tensor([[t]]))
    assert store.stats()["resident_blocks_device"] == 64
    store.append(0, keys[:, 64:65], -keys[:, 64:65], torch.tensor([[64]]))
    tiers = store.tier_of(0)[0].tolist()
    assert tiers[:3] == [HOST] * 3 and tiers[3:] == [DEVICE] * 62
    assert store.stats()["evicted_bytes_device_to_host"] == 3 * store.block_bytes
    # the two spare blocks take the next two appends without moving anything
    for t in (65, 66):
        store.append(0, keys[:, t : t + 1], -keys[:, t : t + 1], torch.tensor([[t]]))
    assert store.stats()["evicted_bytes_device_to_host"] == 3 * store.block_bytes
    got = store.fetch(0, [torch.arange(67)])
    assert torch.equal(got.keys, keys) and torch.equal(got.values, -keys)


def test_eviction_slack_is_capped_in_bytes(tmp_path, monkeypatch):
    # the slack never exceeds _EVICT_SLACK_MAX_BYTES, whatever 1/32 of the tier is
    monkeypatch.setattr(store_module, "_EVICT_SLACK_MAX_BYTES", 16)  # one 1-token block
    store = TieredKVStore(
        1, 1, 2, budgets=TierBudgets(device_bytes=64 * 16, disk_dir=tmp_path), block_tokens=1
    )
    keys = torch.arange(65 * 2, dtype=torch.float32).view(1, 65, 2)
    for t in range(65):
        store.append(0, keys[:, t : t + 1], -keys[:, t : t + 1], torch.tensor([[t]]))
    assert store.stats()["evicted_bytes_device_to_host"] == 2 * store.block_bytes


@settings(max_examples=40, deadline=None)
@given(st.data(), st.booleans())
def test_arena_hands_out_the_lowest_free_slots(data, bounded):
    # The arena keeps a free list instead of scanning `owner`; it must give what the scan would,
    # also after `load` (a restored arena rebuilds the list from `owner`).
    arena = MemoryArena(1, 2, torch.float32, torch.device("cpu"), 40 if bounded else None)
    next_id = 0
    for _ in range(data.draw(st.integers(1, 30), label="ops")):
        op = data.draw(st.sampled_from(["allocate", "release", "load"]), label="op")
        used = torch.nonzero(arena.owner >= 0).flatten().tolist()
        if op == "release" and used:
            gone = data.draw(st.lists(st.sampled_from(used), min_size=1, unique=True), label="slots")
            arena.release(torch.tensor(gone))
            continue
        if op == "load":  # a saved arena whose occupancy differs from this one's free list
            owner = arena.owner.clone()
            if used:
                drop = data.draw(st.lists(st.sampled_from(used), unique=True), label="dropped")
                owner[drop] = -1
            arena.load(arena.data.clone(), owner, int((owner >= 0).sum()))
            continue
        free = arena.num_free()
        count = data.draw(st.integers(1, 9), label="count")
        count = count if free is None else min(count, free)
        if count == 0:
            continue
        grown = torch.cat([arena.owner, torch.full((16 + next_id,), -1)])  # room to grow
        expect = torch.nonzero(grown < 0).flatten()[:count]
        got = arena.allocate(torch.arange(next_id, next_id + count))
        assert got.tolist() == expect.tolist()
        next_id += count
    assert arena.num_used == int((arena.owner >= 0).sum())


def test_oldest_cluster_moves_first_and_active_cluster_stays():
    # 2 blocks of device; cluster 0 is appended to every step, new singletons arrive each step
    store = TieredKVStore(1, 1, 2, budgets=TierBudgets(device_bytes=2 * 2 * 16), block_tokens=2)
    for step in range(6):
        ids = torch.tensor([[0, 100 + step]])
        k = torch.full((1, 2, 2), float(step))
        store.append(0, k, k, ids)
    tiers = store.cluster_tier(0, 0)
    on_device = set(tiers.on_device().tolist())
    assert 0 in on_device and 105 in on_device
    assert all(
        t != DEVICE for t in tiers.tiers[(tiers.cluster_ids != 0) & (tiers.cluster_ids != 105)].tolist()
    )
    assert torch.equal(store.fetch_all(0)[0][0, :, 0], torch.arange(6.0).repeat_interleave(2))


def test_tail_block_being_written_never_moves():
    # 3 device blocks of 2 tokens. Cluster 0's tail block (the oldest block of the step's clusters)
    # still has room when the step needs two new blocks: the evictions must pick other blocks.
    store = TieredKVStore(1, 1, 1, budgets=TierBudgets(device_bytes=3 * 2 * 2 * 4), block_tokens=2)
    keys = torch.arange(7, dtype=torch.float32).view(1, 7, 1)
    for start, ids in ((0, [0, 1, 1]), (3, [5]), (4, [0, 0, 1])):
        end = start + len(ids)
        store.append(0, keys[:, start:end], -keys[:, start:end], torch.tensor([ids]))
    got_k, got_v = store.fetch_all(0)
    assert torch.equal(got_k, keys) and torch.equal(got_v, -keys)
    assert store.tier_of(0).tolist() == [[DEVICE, HOST, HOST, HOST, DEVICE, DEVICE, DEVICE]]


# ---------------------------------------------------------------------------- fetch


def test_fetch_order_padding_lengths():
    gen = torch.Generator().manual_seed(1)
    store = TieredKVStore(2, 3, 4, block_tokens=4)
    ref = Reference(2)
    for _ in range(5):
        keys, values = _kv(3, 6, 4, gen)
        store.append(1, keys, values, torch.randint(0, 4, (3, 6), generator=gen))
        ref.append(1, keys, values)
    all_k, all_v = ref.all(1)
    positions = [torch.tensor([29, 0, 5, 5]), torch.tensor([], dtype=torch.long), torch.tensor([3, 1])]
    result = store.fetch(1, positions)
    assert result.keys.shape == (3, 4, 4) and result.values.shape == (3, 4, 4)
    assert result.lengths.tolist() == [4, 0, 2]
    for head, pos in enumerate(positions):
        n = pos.numel()
        assert torch.equal(result.keys[head, :n], all_k[head, pos])
        assert torch.equal(result.values[head, :n], all_v[head, pos])
        assert torch.count_nonzero(result.keys[head, n:]) == 0
    assert result.bytes_device == 6 * store.token_bytes and result.bytes_host == result.bytes_disk == 0
    assert store.length(1) == 30 and store.length(0) == 0
    assert store.fetch_all(0)[0].shape == (3, 0, 4)


def test_prefetch_matches_fetch_and_checks_request(tmp_path):
    gen = torch.Generator().manual_seed(2)
    store = TieredKVStore(
        2, 2, 4, budgets=TierBudgets(device_bytes=16 * 256, host_bytes=0, disk_dir=tmp_path), block_tokens=8
    )
    for _ in range(20):
        for layer in range(2):
            keys, values = _kv(2, 3, 4, gen)
            store.append(layer, keys, values, torch.randint(0, 50, (2, 3), generator=gen))
    positions = [torch.tensor([0, 7, 59]), torch.tensor([40, 2])]
    handle = store.prefetch(1, positions)
    got = store.fetch(1, positions, handle)
    want = store.fetch(1, positions)
    assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    assert got.bytes_disk > 0 and got.bytes_host == 0  # host tier disabled: evictions went to disk
    with pytest.raises(ValueError, match="prefetched"):
        store.fetch(0, positions, store.prefetch(1, positions))
    store.close()


@pytest.mark.parametrize("host_bytes", [0, 4 * 256])
def test_a_full_disk_fails_the_append_and_loses_nothing(tmp_path, disk_full, host_bytes):
    """The disk tier's file is grown with its space taken at once: a full disk is an OSError
    that names what to do, raised before any block leaves its tier (writing through the memory
    map into space the disk does not have killed the process with SIGBUS). Once space is back,
    the stream goes on with every token where it was."""
    gen = torch.Generator().manual_seed(3)
    store = TieredKVStore(
        2,
        2,
        4,
        budgets=TierBudgets(device_bytes=8 * 256, host_bytes=host_bytes, disk_dir=tmp_path),
        block_tokens=8,
    )
    reference = Reference(2)
    full = disk_full
    failures = 0
    for step in range(60):
        full["on"] = 20 <= step < 40
        for layer in range(2):
            keys, values = _kv(2, 3, 4, gen)
            try:
                store.append(layer, keys, values, torch.randint(0, 50, (2, 3), generator=gen))
            except OSError as exc:
                assert "disk KV tier" in str(exc) and "--host-kv-budget" in str(exc)
                failures += 1
                continue
            reference.append(layer, keys, values)
    assert failures > 0
    for layer in range(2):
        keys, values = store.fetch_all(layer)
        want_k, want_v = reference.all(layer)
        assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    assert store.stats()["resident_tokens_disk"] > 0
    store.close()


# ---------------------------------------------------------------------------- long stream


def _cluster_ids(step, num_heads, num_tokens, gen):
    """Big recurring clusters (0..2), medium ones that live ~20 steps, and fresh singletons."""
    kind = torch.randint(0, 3, (num_heads, num_tokens), generator=gen)
    big = torch.randint(0, 3, (num_heads, num_tokens), generator=gen)
    medium = 1000 + (step // 20) * 10 + torch.randint(0, 10, (num_heads, num_tokens), generator=gen)
    single = 10**6 + step * 64 + torch.arange(num_tokens).expand(num_heads, -1)
    return torch.where(kind == 0, big, torch.where(kind == 1, medium, single))


@pytest.mark.parametrize("block_tokens", [1, 8])
def test_long_stream_bounded_device_and_bit_exact(tmp_path, block_tokens):
    num_layers, num_heads, head_dim = 2, 2, 4
    gen = torch.Generator().manual_seed(3)
    block_bytes = block_tokens * 2 * head_dim * 4
    device_bytes = 40 * block_bytes + 7  # not a multiple of the block size on purpose
    budgets = TierBudgets(device_bytes=device_bytes, host_bytes=120 * block_bytes, disk_dir=tmp_path)
    store = TieredKVStore(num_layers, num_heads, head_dim, budgets=budgets, block_tokens=block_tokens)
    ref = Reference(num_layers)
    num_appends = 0
    for step in range(800):
        for layer in range(num_layers):
            num_tokens = int(torch.randint(1, 6, (), generator=gen))
            keys, values = _kv(num_heads, num_tokens, head_dim, gen)
            store.append(layer, keys, values, _cluster_ids(step, num_heads, num_tokens, gen))
            ref.append(layer, keys, values)
            num_appends += 1
            stats = store.stats()
            assert stats["resident_bytes_device"] <= device_bytes
            assert stats["allocated_bytes_device"] <= device_bytes
            assert stats["resident_bytes_host"] <= budgets.host_bytes
        if step % 97 == 0:
            layer = step % num_layers
            all_k, all_v = ref.all(layer)
            n = all_k.shape[1]
            positions = [
                torch.randint(0, n, (int(torch.randint(1, 30, (), generator=gen)),), generator=gen)
                for _ in range(num_heads)
            ]
            result = store.fetch(layer, positions)
            for head, pos in enumerate(positions):
                assert torch.equal(result.keys[head, : pos.numel()], all_k[head, pos])
                assert torch.equal(result.values[head, : pos.numel()], all_v[head, pos])
    assert num_appends >= 1600
    stats = store.stats()
    assert stats["peak_resident_bytes_device"] <= device_bytes
    assert stats["resident_tokens_disk"] > 0 and stats["resident_tokens_host"] > 0
    total_tokens = sum(stats[f"resident_tokens_{t}"] for t in ("device", "host", "disk"))
    assert total_tokens == stats["history_tokens"] == stats["appended_bytes"] // store.token_bytes
    # evicted bytes = blocks that left each tier, whole blocks
    blocks_down = stats["evicted_bytes_device_to_host"] + stats["evicted_bytes_device_to_disk"]
    assert blocks_down % store.block_bytes == 0
    assert blocks_down // store.block_bytes == stats["num_blocks"] - stats["resident_blocks_device"]
    assert (
        stats["evicted_bytes_host_to_disk"] // store.block_bytes
        == stats["resident_blocks_disk"] - stats["evicted_bytes_device_to_disk"] // store.block_bytes
    )
    before = store.stats()
    for layer in range(num_layers):
        all_k, all_v = ref.all(layer)
        got_k, got_v = store.fetch_all(layer)
        assert torch.equal(got_k, all_k) and torch.equal(got_v, all_v)
        tiers = store.tier_of(layer)
        assert tiers.shape == all_k.shape[:2]
        assert set(tiers.unique().tolist()) == {DEVICE, HOST, DISK}
    after = store.stats()
    fetched = sum(
        after[f"fetched_bytes_{t}"] - before[f"fetched_bytes_{t}"] for t in ("device", "host", "disk")
    )
    assert fetched == stats["history_tokens"] * store.token_bytes
    # every cluster that is off the device has no tokens written on the device after it left
    for layer in range(num_layers):
        for head in range(num_heads):
            ct = store.cluster_tier(layer, head)
            assert (
                ct.cluster_ids.numel()
                == torch.unique(
                    store._blk_cluster.t[store._pos_block[layer][head, : store.length(layer)]]
                ).numel()
            )
    store.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_round_trip_through_disk(tmp_path, dtype):
    gen = torch.Generator().manual_seed(4)
    itemsize = torch.empty((), dtype=dtype).element_size()
    block_bytes = 2 * 2 * 3 * itemsize
    store = TieredKVStore(
        1,
        2,
        3,
        dtype=dtype,
        budgets=TierBudgets(device_bytes=6 * block_bytes, host_bytes=block_bytes, disk_dir=tmp_path),
        block_tokens=2,
    )
    ref = Reference(1)
    for step in range(30):
        keys, values = _kv(2, 2, 3, gen, dtype)
        store.append(0, keys, values, torch.tensor([[step, step], [step, 7]]))
        ref.append(0, keys, values)
    got_k, got_v = store.fetch_all(0)
    all_k, all_v = ref.all(0)
    assert got_k.dtype == dtype
    assert torch.equal(got_k.view(torch.uint8), all_k.view(torch.uint8))
    assert torch.equal(got_v.view(torch.uint8), all_v.view(torch.uint8))
    assert store.stats()["resident_tokens_disk"] > 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    block_tokens=st.integers(1, 4),
    device_blocks=st.integers(6, 14),
    host_blocks=st.one_of(st.none(), st.integers(0, 6)),
    steps=st.lists(
        st.tuples(
            st.integers(0, 1),
            st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=3), min_size=2, max_size=2),
        ),
        min_size=1,
        max_size=25,
    ),
)
def test_property_any_stream_is_retrievable(tmp_path, block_tokens, device_blocks, host_blocks, steps):
    head_dim = 2
    block_bytes = block_tokens * 2 * head_dim * 4
    budgets = TierBudgets(
        device_bytes=device_blocks * block_bytes,
        host_bytes=None if host_blocks is None else host_blocks * block_bytes,
        disk_dir=tmp_path,
    )
    with TieredKVStore(2, 2, head_dim, budgets=budgets, block_tokens=block_tokens) as store:
        ref = Reference(2)
        counter = 0
        for layer, per_head in steps:
            num_tokens = min(len(per_head[0]), len(per_head[1]))
            ids = torch.tensor([row[:num_tokens] for row in per_head])
            keys = torch.arange(counter, counter + 2 * num_tokens * head_dim, dtype=torch.float32).view(
                2, num_tokens, head_dim
            )
            counter += keys.numel()
            store.append(layer, keys, -keys, ids)
            ref.append(layer, keys, -keys)
            assert store.stats()["resident_bytes_device"] <= budgets.device_bytes
        for layer in range(2):
            if ref.keys[layer]:
                all_k, all_v = ref.all(layer)
                got_k, got_v = store.fetch_all(layer)
                assert torch.equal(got_k, all_k) and torch.equal(got_v, all_v)


# ---------------------------------------------------------------------------- budgets and bad input


def test_device_budget_below_one_block_per_head_per_layer():
    # 3 layers x 2 heads x (4 tokens x K+V x 8 dims x 4 B = 256 B) = 1536 B minimum
    with pytest.raises(ValueError, match="minimum of 1536 bytes"):
        TieredKVStore(3, 2, 8, budgets=TierBudgets(device_bytes=1535), block_tokens=4)
    TieredKVStore(3, 2, 8, budgets=TierBudgets(device_bytes=1536), block_tokens=4)


def test_device_budget_too_small_for_step():
    store = TieredKVStore(1, 2, 8, budgets=TierBudgets(device_bytes=4 * 256), block_tokens=4)
    keys = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="too small for this step.*6 blocks"):
        store.append(0, keys, keys, torch.tensor([[0, 1, 2], [0, 1, 2]]))
    assert store.length(0) == 0 and store.stats()["num_clusters"] == 0  # a refused step changes nothing
    store.append(0, keys, keys, torch.tensor([[0, 0, 0], [1, 1, 2]]))  # 3 blocks fit
    assert store.length(0) == 3
    assert store.cluster_tier(0, 0).cluster_ids.tolist() == [0]
    assert store.cluster_tier(0, 1).tiers.tolist() == [DEVICE, DEVICE]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_layers": 0}, "num_layers"),
        ({"num_kv_heads": -1}, "num_kv_heads"),
        ({"head_dim": 2.5}, "head_dim"),
        ({"block_tokens": 0}, "block_tokens"),
        ({"dtype": torch.int32}, "dtype"),
        ({"device": "nonsense"}, "device"),
        ({"budgets": {"device_bytes": 5}}, "budgets"),
    ],
)
def test_bad_constructor_arguments(kwargs, field):
    args = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 2, **kwargs}
    with pytest.raises(ValueError, match=field):
        TieredKVStore(args.pop("num_layers"), args.pop("num_kv_heads"), args.pop("head_dim"), **args)


def test_bad_append_and_fetch_arguments():
    store = TieredKVStore(2, 2, 4)
    good = torch.zeros(2, 3, 4)
    ids = torch.zeros(2, 3, dtype=torch.long)
    cases = [
        ((5, good, good, ids), "layer"),
        ((-1, good, good, ids), "layer"),
        ((0, torch.zeros(3, 3, 4), good, ids), "keys"),
        ((0, good, torch.zeros(2, 3, 5), ids), "values"),
        ((0, good, torch.zeros(2, 2, 4), ids), "values"),
        ((0, good.half(), good, ids), "keys dtype"),
        ((0, good, good, torch.zeros(2, 3)), "cluster_ids"),
        ((0, good, good, torch.zeros(2, 2, dtype=torch.long)), "cluster_ids"),
        ((0, good, good, torch.full((2, 3), -1)), "cluster_ids"),
        ((0, good, good, torch.full((2, 3), 2**32)), "cluster_ids"),
        ((0, good.tolist(), good, ids), "keys"),
    ]
    for args, field in cases:
        with pytest.raises(ValueError, match=field):
            store.append(*args)
    assert store.length(0) == 0
    store.append(0, good, good, ids)
    for positions, field in [
        ([torch.tensor([0])], "positions"),
        ([torch.tensor([0]), torch.tensor([3])], r"positions\[1\]"),
        ([torch.tensor([0.0]), torch.tensor([1])], r"positions\[0\]"),
        ([torch.tensor([[0]]), torch.tensor([1])], r"positions\[0\]"),
        ([torch.tensor([-1]), torch.tensor([1])], r"positions\[0\]"),
    ]:
        with pytest.raises(ValueError, match=field):
            store.fetch(0, positions)
    with pytest.raises(ValueError, match="layer"):
        store.fetch(2, [torch.tensor([0])] * 2)
    with pytest.raises(ValueError, match="kv_head"):
        store.cluster_tier(0, 2)
    with pytest.raises(ValueError, match="layer"):
        store.tier_of(9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tiers_prefetch_bit_exact(tmp_path):
    gen = torch.Generator().manual_seed(5)
    budgets = TierBudgets(device_bytes=8 * 4 * 2 * 8 * 2, host_bytes=8 * 4 * 2 * 8 * 2, disk_dir=tmp_path)
    store = TieredKVStore(2, 2, 8, dtype=torch.float16, device="cuda", budgets=budgets, block_tokens=4)
    ref = Reference(2)
    for step in range(100):
        for layer in range(2):
            keys, values = _kv(2, 3, 8, gen, torch.float16)
            store.append(layer, keys.cuda(), values.cuda(), _cluster_ids(step, 2, 3, gen))
            ref.append(layer, keys, values)
            # the device tier takes its whole budget at once: no transient growth over it
            assert store.stats()["allocated_bytes_device"] == budgets.device_bytes
    assert store._arenas[HOST].data.is_pinned()
    for layer in range(2):
        all_k, all_v = ref.all(layer)
        positions = [torch.arange(0, all_k.shape[1], 3), torch.arange(all_k.shape[1] - 1, -1, -2)]
        handle = store.prefetch(layer, positions)
        result = store.fetch(layer, positions, handle)
        assert result.keys.device.type == "cuda"
        for head, pos in enumerate(positions):
            assert torch.equal(result.keys[head, : pos.numel()].cpu(), all_k[head, pos])
            assert torch.equal(result.values[head, : pos.numel()].cpu(), all_v[head, pos])
        got_k, got_v = store.fetch_all(layer)
        assert torch.equal(got_k.cpu(), all_k) and torch.equal(got_v.cpu(), all_v)
    store.close()


def test_store_works_across_inference_mode_boundaries():
    # tables that grow inside a caller's inference_mode must stay updatable outside it, and back
    store = TieredKVStore(1, 1, 2, budgets=TierBudgets(device_bytes=4 * 2 * 2 * 4 * 2), block_tokens=2)
    ref = Reference(1)
    for step in range(12):
        with torch.inference_mode(step % 2 == 0):
            keys = torch.full((1, 3, 2), float(step))
            store.append(0, keys, -keys, torch.tensor([[step, step, 100 + step]]))
            result = store.fetch(0, [torch.arange(store.length(0))])
            assert not result.keys.is_inference()
        ref.append(0, keys, -keys)
    with torch.inference_mode():
        assert store.stats()["resident_tokens_host"] > 0
    got_k, got_v = store.fetch_all(0)
    assert torch.equal(got_k, ref.all(0)[0]) and torch.equal(got_v, ref.all(0)[1])


def test_memory_arena_growth_and_preallocation():
    growing = MemoryArena(2, 3, torch.float32, torch.device("cpu"), max_blocks=100)
    growing.allocate(torch.arange(5))
    assert growing.capacity == 16 and growing.used_prefix() == 5
    growing.allocate(torch.arange(5, 40))
    assert growing.capacity == 40 and growing.num_free() == 60
    growing.release(torch.tensor([39]))
    assert growing.used_prefix() == 39
    upfront = MemoryArena(2, 3, torch.float32, torch.device("cpu"), max_blocks=100, preallocate=True)
    upfront.allocate(torch.arange(3))
    assert upfront.capacity == 100 and upfront.allocated_bytes == 100 * 2 * 2 * 3 * 4
