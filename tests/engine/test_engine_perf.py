"""The fast paths give the results of the straightforward implementations they replaced.

The reference code below is the earlier implementation, kept verbatim in spirit: WiCSum by a
stable float64 sort of (value, index), ReSV selection with per-call repeats and masks,
clustering with XOR + popcount distances and representatives normalised on every call, and
light attention with K/V and the mask repeated per query head. Random streams with cluster
structure, ties and heavy tails must give the same selections and cluster ids bit for bit.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import vrex.resv as resv
from vrex.engine import retrieval
from vrex.engine.retrieval import light_attention
from vrex.resv import selectors
from vrex.resv.clusters import HCTable, cluster_scores
from vrex.resv.hashing import hamming, hash_codes

torch.set_num_threads(1)


# -- reference implementations (the previous code) ------------------------------------------------
def ref_wicsum_select(weights, ratio):
    rows, n = weights.shape
    if n == 0:
        return torch.zeros_like(weights, dtype=torch.bool)
    w = weights.to(torch.float64)
    sorted_w, order = torch.sort(w, dim=1, descending=True, stable=True)
    cums = sorted_w.cumsum(1)
    threshold = ratio * torch.sort(w, dim=1).values.sum(1, keepdim=True)  # the total: ascending order
    crossed = cums > threshold
    positive = (sorted_w > 0).sum(1)
    first = torch.where(crossed.any(1), crossed.float().argmax(1) + 1, positive)
    if ratio >= 1.0:  # no prefix exceeds the whole row: every positive weight, whatever the rounding
        first = positive
    keep_sorted = torch.arange(n).unsqueeze(0) < first.unsqueeze(1)
    mask = torch.zeros(rows, n, dtype=torch.bool)
    mask.scatter_(1, order, keep_sorted)
    return mask


def ref_select(sel, layer, query, history_len, scaling):
    table = sel.tables[layer]
    mask = sel.always_mask(history_len)
    hkv, c = sel.num_kv_heads, table.num_clusters
    if not history_len or not c:
        return mask
    scores = cluster_scores(table, query, scaling)
    counts = table.counts.view.repeat_interleave(table.heads_per_group, 0).to(torch.float32)
    valid = (counts > 0)[:, None, :]
    if sel.resv.weight_form == "softmax":
        rowmax = scores.masked_fill(~valid, -torch.inf).amax(-1, keepdim=True)
        weights = torch.exp(scores - rowmax) * counts[:, None, :]
    else:
        weights = scores.clamp_min(0) * counts[:, None, :]
    weights = weights.masked_fill(~valid, 0.0)
    rows = weights.reshape(-1, c)
    ratio = sel.resv.decode_ratio if query.shape[1] == 1 else sel.resv.frame_ratio
    cluster_mask = ref_wicsum_select(rows, ratio).reshape(hkv, -1, c).any(1)
    member = table.member_of.view.repeat_interleave(table.heads_per_group, 0)
    return mask | cluster_mask.gather(1, member)


def ref_means(table: HCTable):
    return table.sums.view / table.counts.view.clamp_min(1).to(torch.float32)[..., None, None]


def ref_cluster(table: HCTable, keys):
    """Cluster ids the previous HCTable.add computed (without appending)."""
    keys = keys.to(torch.float32)
    gk = table._group_keys(keys)
    g, t = gk.shape[:2]
    codes = hash_codes(gk.reshape(g, t, -1), table.planes)
    c_old = table.num_clusters
    th = table.cfg.hamming_threshold
    dist_old = hamming(codes[:, :, None], table.codes.view[:, None])
    dist_new = hamming(codes[:, :, None], codes[:, None])
    ok_old = (dist_old < th) & table.open_mask()[:, None, :]
    ok_new = (dist_new < th) & torch.ones(t, t, dtype=torch.bool).tril(-1)
    floor = table.cfg.similarity_floor
    if floor is not None:
        unit = F.normalize(gk, dim=-1)
        ref_old = F.normalize(ref_means(table), dim=-1)
        sim_old = torch.einsum("gthd,gchd->gtch", unit, ref_old).amin(-1)
        sim_new = torch.einsum("gthd,gshd->gtsh", unit, unit).amin(-1)
        ok_old &= sim_old >= floor
        ok_new &= sim_new >= floor
    has_old = ok_old.any(-1)
    seeded = ~has_old
    while True:
        nxt = ~has_old & ~(ok_new & seeded[:, None, :]).any(-1)
        if torch.equal(nxt, seeded):
            break
        seeded = nxt
    ok_new &= seeded[:, None, :]
    if floor is not None:
        cost_old = torch.where(ok_old, -sim_old, torch.inf)
        cost_new = torch.where(ok_new, -sim_new, torch.inf)
    else:
        cost_old = torch.where(ok_old, dist_old.float(), torch.inf)
        cost_new = torch.where(ok_new, dist_new.float(), torch.inf)
    choice = torch.cat([cost_old, cost_new], -1).argmin(-1)
    seed_rank = seeded.long().cumsum(-1) - 1
    joined_new = c_old + seed_rank.gather(1, (choice - c_old).clamp_min(0))
    cluster = torch.where(choice >= c_old, joined_new, choice)
    cluster = torch.where(seeded, c_old + seed_rank, cluster)
    return cluster.repeat_interleave(table.heads_per_group, dim=0)


def ref_light_attention(query, hist_k, hist_v, lengths, key, value, scaling):
    hq, t, d = query.shape
    hkv, hist_len = hist_k.shape[0], hist_k.shape[1]
    group = hq // hkv
    k = torch.cat([hist_k.to(key.dtype), key], 1)
    v = torch.cat([hist_v.to(value.dtype), value], 1)
    hist_ok = torch.arange(hist_len)[None, :] < lengths[:, None]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = torch.cat([hist_ok[:, None, :].expand(hkv, t, hist_len), causal.expand(hkv, t, t)], -1)
    out = F.scaled_dot_product_attention(
        query[None],
        k.repeat_interleave(group, 0)[None],
        v.repeat_interleave(group, 0)[None],
        attn_mask=allowed.repeat_interleave(group, 0)[None],
        scale=scaling,
    )[0]
    return out.transpose(0, 1)


# -- WiCSum ------------------------------------------------------------------------------------
def _weight_rows(gen, rows, cols, kind):
    if kind == "ties":  # small integers: many equal weights, zeros included
        return torch.randint(0, 4, (rows, cols), generator=gen).float()
    if kind == "softmax":  # the selector's form: exp of spread scores times counts, huge range
        scores = torch.randn(rows, cols, generator=gen) * 12
        counts = torch.randint(1, 9, (1, cols), generator=gen).float()
        return torch.exp(scores - scores.amax(1, keepdim=True)) * counts
    return torch.rand(rows, cols, generator=gen) ** 6 * 1000


@pytest.mark.parametrize("kind", ["ties", "softmax", "uniform"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.9, 0.999, 1.0])
def test_wicsum_equals_sorted_reference(kind, ratio):
    gen = torch.Generator().manual_seed(hash((kind, ratio)) % 2**31)
    for rows, cols in [(1, 1), (3, 2), (40, 17), (200, 300)]:
        w = _weight_rows(gen, rows, cols, kind)
        w[0] = 0.0  # an all-zero row selects nothing
        assert torch.equal(resv.wicsum_select(w, ratio), ref_wicsum_select(w, ratio))
        assert torch.equal(resv.wicsum_select(w.double(), ratio), ref_wicsum_select(w.double(), ratio))
        assert torch.equal(resv.wicsum_select(w.half(), ratio), ref_wicsum_select(w.half(), ratio))


def test_wicsum_early_exit_rows_equal_sorted_reference():
    """Rows whose largest weight alone passes the threshold skip the sort; mixed with rows
    that need it, with the maximum repeated (the first one is kept), and in both precisions."""
    gen = torch.Generator().manual_seed(11)
    peaky = torch.rand(40, 500, generator=gen) * 0.01
    peaky[torch.arange(40), torch.randint(0, 500, (40,), generator=gen)] = 10.0
    peaky[:10, 7] = 10.0  # a repeated maximum: the lower index goes first
    broad = torch.rand(30, 500, generator=gen)
    w = torch.cat([peaky, broad])[torch.randperm(70, generator=gen)]
    for ratio in (0.2, 0.4, 0.5, 0.97):
        for rows in (w, w.double()):
            assert torch.equal(resv.wicsum_select(rows, ratio), ref_wicsum_select(rows, ratio))
    picked = resv.wicsum_select(peaky[:10], 0.4)  # below the early exit's row count: sorted path
    assert picked.sum(1).tolist() == [1] * 10
    assert torch.equal(resv.wicsum_select(peaky, 0.4)[:10], picked)


def test_wicsum_candidates_with_crowded_ties_and_flat_rows():
    """The CPU path sorts only each row's candidates: the cut must still land where the full
    sort puts it when more weights equal the cut than it keeps (lower indices win), beside
    rows led by one weight, all-zero rows, and flat rows (where every weight is a candidate
    and the full sort is taken instead)."""
    gen = torch.Generator().manual_seed(3)
    crowded = torch.rand(24, 400, generator=gen) * 1e-3
    crowded[:, [40, 7, 300, 99]] = torch.tensor([10.0, 5.0, 5.0, 5.0])  # ratio 0.6 keeps 10 and two 5s
    led = torch.rand(12, 400, generator=gen) * 1e-3
    led[:, 5] = 100.0
    led[:3, 250] = 100.0  # a repeated leader
    zero = torch.zeros(4, 400)
    w = torch.cat([crowded, led, zero])[torch.randperm(40, generator=gen)]
    for ratio in (0.6, 0.3, 0.9):
        for rows in (w, w.double()):
            assert torch.equal(resv.wicsum_select(rows, ratio), ref_wicsum_select(rows, ratio))
    picked = resv.wicsum_select(crowded, 0.6)
    assert picked.sum(1).tolist() == [3] * 24 and bool(picked[:, [40, 7, 99]].all())
    flat = 1.0 + torch.rand(40, 300, generator=gen) * 1e-3
    assert torch.equal(resv.wicsum_select(flat, 0.5), ref_wicsum_select(flat, 0.5))


@pytest.mark.parametrize(
    "cfg",
    [resv.DEFAULT.replace(num_buckets=8), resv.DEFAULT.replace(mass="retrievable")],
    ids=["buckets", "mass"],
)
def test_resv_query_blocks_keep_masks_and_exit_fraction(cfg, monkeypatch):
    hq, hkv, d = 6, 2, 16
    gen = torch.Generator().manual_seed(8)
    sel = resv.make_selector(
        1, hq, hkv, d, resv.SelectorConfig(policy="resv", sink_tokens=2, recent_tokens=4, resv=cfg)
    )
    for _ in range(20):
        sel.observe(0, torch.randn(hkv, 10, d, generator=gen))
    q = torch.randn(hq, 23, d, generator=gen)
    one = sel.select(0, q, 200, d**-0.5, "frame")
    monkeypatch.setattr(selectors, "CPU_BLOCK_BYTES", 1)
    assert [b.shape[1] for b in selectors._query_blocks(q, sel.tables[0].num_clusters)] == [8, 8, 7]
    blocked = sel.select(0, q, 200, d**-0.5, "frame")
    assert torch.equal(one.token_mask, blocked.token_mask)
    assert torch.equal(one.selected_clusters, blocked.selected_clusters)
    if cfg.num_buckets:
        assert blocked.early_exit_fraction == pytest.approx(one.early_exit_fraction, rel=1e-6)


# -- ReSV selection and clustering on random streams -------------------------------------------------
CONFIGS = {
    "default": resv.DEFAULT,
    "paper": resv.PAPER,
    "capped": resv.DEFAULT.replace(max_cluster_tokens=3),
    "linear": resv.PAPER.replace(weight_form="linear"),
    "radius": resv.DEFAULT.replace(estimator="radius", frame_ratio=0.5),
    "bound-all": resv.PAPER.replace(estimator="bound", frame_ratio=1.0),
    "paper-floor": resv.PAPER.replace(similarity_floor=0.5, decode_ratio=0.6),
}


@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "blocked"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_resv_stream_equals_reference(name, blocked, monkeypatch):
    if blocked:  # the queries scored a few tokens at a time, as a long history's frame is on a CPU
        monkeypatch.setattr(selectors, "CPU_BLOCK_BYTES", 1)
    cfg = CONFIGS[name]
    layers, hq, hkv, d = 2, 6, 2, 16
    sel = resv.make_selector(
        layers, hq, hkv, d, resv.SelectorConfig(policy="resv", sink_tokens=3, recent_tokens=5, resv=cfg)
    )
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        sel = resv.make_selector(
            layers, hq, hkv, d, resv.SelectorConfig(policy="resv", sink_tokens=3, recent_tokens=5, resv=cfg)
        )
        bases = torch.randn(5, hkv, d, generator=gen)
        n = 0
        for step in range(24):
            t = 1 if step % 5 == 4 else 10
            for layer in range(layers):
                q = torch.randn(hq, t, d, generator=gen) * 2
                pick = torch.randint(0, 5, (t,), generator=gen)
                k = bases[pick].transpose(0, 1) + 0.3 * torch.randn(hkv, t, d, generator=gen)
                assert torch.equal(sel.tables[layer].means(), ref_means(sel.tables[layer]))
                got = sel.select(layer, q, n, d**-0.5)
                assert torch.equal(got.token_mask, ref_select(sel, layer, q, n, d**-0.5)), (seed, step, layer)
                expected_ids = ref_cluster(sel.tables[layer], k)
                assert torch.equal(sel.observe(layer, k), expected_ids), (seed, step, layer)
                if step == 9:
                    sel.on_evicted(layer, 0, torch.tensor([0, 1]))
                if step >= 12 and step % 3 == 0:  # most clusters closed: the open-columns path
                    old = torch.arange(int(0.8 * sel.tables[layer].num_clusters))
                    for head in range(hkv):
                        sel.on_evicted(layer, head, old)
            if step == 14:  # a restore drops the caches; they must rebuild identically
                sel.load_state_dict(sel.state_dict())
            n += t
        assert sel.tables[0].num_clusters > 3, "the stream should form several clusters"


@pytest.mark.parametrize("cfg", [resv.DEFAULT, CONFIGS["radius"], resv.DEFAULT.replace(estimator="bound")])
def test_resv_rows_whose_real_scores_are_all_negative(cfg):
    """Uneven seeding leaves empty cluster slots in one KV head (they score 0); queries that
    score every real cluster of that head below 0 must still weigh only the real ones."""
    layers, hq, hkv, d = 1, 4, 2, 16
    gen = torch.Generator().manual_seed(5)
    config = resv.SelectorConfig(policy="resv", sink_tokens=0, recent_tokens=2, resv=cfg)
    sel = resv.make_selector(layers, hq, hkv, d, config)
    u, v = torch.nn.functional.normalize(torch.randn(2, d, generator=gen), dim=1) * 4
    n = 0
    for _ in range(6):
        spread = torch.randn(10, d, generator=gen) * 3  # head 0: many clusters
        tight = torch.where(torch.arange(10)[:, None] % 2 == 0, u, v)  # head 1: two
        sel.observe(0, torch.stack([spread, tight + 0.01 * torch.randn(10, d, generator=gen)]))
        n += 10
    counts = sel.tables[0].counts.view
    assert bool((counts == 0).any()), "the heads should seed unevenly"
    q = torch.randn(hq, 7, d, generator=gen)
    # the query heads of KV head 1 score both real clusters far below 0 (and apart), so a max
    # taken over the empty slots' 0 would flatten them at the exp floor
    q[2:] = -(60 * u + 45 * v)
    got = sel.select(0, q, n, d**-0.5)
    assert torch.equal(got.token_mask, ref_select(sel, 0, q, n, d**-0.5))


# -- light attention ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "attend", [light_attention, retrieval._light_attention_batched], ids=["cpu", "batched"]
)
@pytest.mark.parametrize("lengths", [(30, 30), (30, 7), (0, 0), (12, 3)])
@pytest.mark.parametrize("t", [5, 1], ids=["frame", "decode"])
def test_light_attention_equals_repeated_reference(lengths, attend, t):
    gen = torch.Generator().manual_seed(1)
    hq, hkv, d = 6, 2, 8
    width = max(lengths)
    q = torch.randn(hq, t, d, generator=gen)
    hk, hv = torch.randn(hkv, width, d, generator=gen), torch.randn(hkv, width, d, generator=gen)
    k, v = torch.randn(hkv, t, d, generator=gen), torch.randn(hkv, t, d, generator=gen)
    lens = torch.tensor(lengths)
    got = attend(q, hk, hv, lens, k, v, d**-0.5)
    ref = ref_light_attention(q, hk, hv, lens, k, v, d**-0.5)
    assert got.shape == (t, hq, d)
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-6)


# -- speed: the fast selection beats the reference on a frame-sized problem ------------------------
@pytest.mark.slow
def test_select_is_faster_than_reference():
    layers, hq, hkv, d = 1, 9, 3, 64
    sel = resv.make_selector(
        layers, hq, hkv, d, resv.SelectorConfig(policy="resv", sink_tokens=4, recent_tokens=64)
    )
    gen = torch.Generator().manual_seed(0)
    n = 0
    for _ in range(25):  # ~1700 tokens of mostly singleton clusters, like layer 0 of the demo model
        k = torch.randn(hkv, 67, d, generator=gen)
        sel.observe(0, k)
        n += 67
    q = torch.randn(hq, 67, d, generator=gen)

    def best(fn):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    fast = best(lambda: sel.select(0, q, n, d**-0.5))
    slow = best(lambda: ref_select(sel, 0, q, n, d**-0.5))
    assert fast * 1.5 < slow, (fast, slow)


# -- the benchmark entry points run (tiny model, real sample video) --------------------------------
def test_engine_bench_runs_on_a_tiny_model(tmp_path):
    from vrex.engine import Engine, EngineConfig
    from vrex.engine.bench import batch_throughput, phase_profile
    from vrex.models import load_model, tiny_random
    from vrex.video import sample_video

    try:
        sample_video("bikes.mp4")
    except FileNotFoundError:
        pytest.skip("sample videos not installed (scripts/fetch_assets.sh)")
    adapter = load_model(tiny_random("smolvlm", folder=tmp_path / "m"))
    engine = Engine(EngineConfig(model_dir=str(adapter.path)), adapter=adapter)
    report = phase_profile(engine, warm_frames=2, frames=2)
    phases = report["per_frame_ms"]
    for key in (
        "select_ms",
        "observe_hc_clustering_ms",
        "store_append_ms",
        "store_fetch_ms",
        "light_attention_ms",
        "mlp_ms",
    ):
        assert phases[key] > 0, key
    assert phases["frame_step_ms"] >= phases["select_ms"] + phases["light_attention_ms"]
    assert "forward" not in vars(engine.adapter.language_model.layers[0].mlp), "timers must be removed"
    out = batch_throughput(adapter, sessions=2, warm_frames=1, rounds=1)
    assert out["frames_per_s_batched"] > 0 and out["frames_per_s_sequential"] > 0
    assert out["batched_engine"]["frame_rows"] == 4
