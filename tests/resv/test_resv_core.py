"""ReSV core: hashing, Hamming distance, WiCSum (exact and bucketed), selectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vrex.resv as resv

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# -- WiCSum -------------------------------------------------------------------------------
def test_wicsum_paper_fig9_example():
    # Fig. 9: score x count terms 36, 24, 21, ... row sum 95, ratio 0.8 -> Th 76 -> 3 clusters
    weights = torch.tensor([[9.0 * 4, 2.0 * 2, 8.0 * 3, 7.0 * 3, 1.0 * 4, 3.0 * 2]])
    assert float(weights.sum()) == 95.0
    mask = resv.wicsum_select(weights, 0.8)
    assert mask.tolist() == [[True, False, True, True, False, False]]


def test_wicsum_ties_go_to_lower_index():
    mask = resv.wicsum_select(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), 0.4)
    assert mask.tolist() == [[True, True, False, False]]


def test_wicsum_ratio_one_takes_all_positive_and_zero_row_nothing():
    w = torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert resv.wicsum_select(w, 1.0).tolist() == [[True, False, True], [False, False, False]]
    # softmax-like rows: thousands of weights, many tiny, some zero; no running sum may stop
    # short of the last positive weight because the total was rounded another way
    g = torch.Generator().manual_seed(0)
    s = torch.randn(200, 3000, generator=g) * 6
    w = (s - s.amax(1, keepdim=True)).clamp_min(-87).exp() * torch.randint(0, 3, (1, 3000), generator=g)
    assert torch.equal(resv.wicsum_select(w, 1.0), w > 0)


weights_st = st.integers(1, 6).flatmap(
    lambda rows: st.integers(1, 40).flatmap(
        lambda cols: st.lists(
            st.lists(st.floats(0, 1000, allow_nan=False, width=32), min_size=cols, max_size=cols),
            min_size=rows,
            max_size=rows,
        )
    )
)


@settings(max_examples=150, deadline=None)
@given(weights_st, st.floats(0.01, 0.99), st.integers(1, 64))
def test_wicsum_properties(rows, ratio, buckets):
    w = torch.tensor(rows, dtype=torch.float32)
    mask = resv.wicsum_select(w, ratio)
    w64 = w.double()
    for r in range(w.shape[0]):
        total = float(w64[r].sum())
        picked = float(w64[r][mask[r]].sum())
        if total == 0:
            assert not mask[r].any()
            continue
        assert picked > ratio * total
        # minimal: dropping the smallest picked weight falls to or below the threshold
        smallest = float(w64[r][mask[r]].min())
        assert picked - smallest <= ratio * total * (1 + 1e-12)
        # largest-weight: nothing left out is larger than anything taken
        if (~mask[r]).any():
            assert float(w64[r][~mask[r]].max()) <= smallest
    bucketed, frac = resv.wicsum_select_bucketed(w, ratio, buckets)
    assert bool((bucketed | ~mask).all()), "bucketed must be a superset of exact"
    assert bool(((frac >= 0) & (frac <= 1)).all())


def test_cut_counts_equal_one_running_sum_over_the_whole_row():
    """The cut widens its prefix in pieces (64, 256, 1024, ... terms), continuing each row's
    running sum; it must equal one float64 running sum over the whole descending row."""
    from vrex.resv.wicsum import cut_counts, sorted_values

    g = torch.Generator().manual_seed(3)
    s = torch.randn(120, 6000, generator=g) * torch.linspace(0.5, 8, 120)[:, None]
    w = (s - s.amax(1, keepdim=True)).clamp_min(-87).exp()
    ascending = sorted_values(w)
    for ratio in (0.2, 0.5, 0.9, 0.97, 0.999):
        got = cut_counts(ascending, ratio)
        rows = ascending.numpy()
        want = []
        for row in rows:
            running = np.cumsum(row[::-1].astype(np.float64))
            threshold = ratio * row.sum(dtype=np.float64)
            want.append(int(np.searchsorted(running, threshold, side="right")) + 1)
        assert got.tolist() == want
        assert int(got.max()) > 1024 or ratio < 0.9  # the high ratios cross after several pieces


def test_bucketed_early_exit_processes_less_on_skewed_rows():
    w = torch.cat([torch.tensor([[1000.0]]), torch.rand(1, 999)], 1)
    mask, frac = resv.wicsum_select_bucketed(w, 0.5, 20)
    assert mask[0, 0] and mask.sum() < 50
    assert float(frac) < 0.05


def _forty_rows_with(value: float) -> torch.Tensor:
    w = torch.ones(40, 3)
    w[5, 1] = value
    return w


@pytest.mark.parametrize(
    "args, needle",
    [
        ((torch.ones(3), 0.5), "weights"),
        ((torch.ones(2, 3, dtype=torch.int64), 0.5), "floating"),
        ((torch.tensor([[1.0, float("nan")]]), 0.5), "NaN"),
        ((torch.tensor([[1.0, -1.0]]), 0.5), "non-negative"),
        ((_forty_rows_with(float("nan")), 0.5), "NaN"),  # rows enough for the early exit
        ((_forty_rows_with(float("inf")), 0.5), "Inf"),
        ((_forty_rows_with(-2.0), 0.5), "non-negative"),
        ((torch.ones(2, 3), 0.0), "ratio"),
        ((torch.ones(2, 3), 1.5), "ratio"),
    ],
)
def test_wicsum_bad_input(args, needle):
    with pytest.raises(ValueError, match=needle):
        resv.wicsum_select(*args)
    with pytest.raises(ValueError, match=needle):
        resv.wicsum_select_bucketed(*args, 8)


def test_presets_are_read_only():
    with pytest.raises(TypeError):
        resv.PRESETS["paper"] = resv.DEFAULT
    with pytest.raises(TypeError):
        resv.PRESETS["mine"] = resv.DEFAULT
    with pytest.raises(TypeError):
        del resv.PRESETS["default"]
    assert resv.preset("paper") is resv.PAPER and sorted(resv.PRESETS) == ["default", "paper"]


# -- hashing ------------------------------------------------------------------------------
def _bits_reference(keys, planes):
    return (keys @ planes > 0).to(torch.int64)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 80), st.integers(0, 10_000))
def test_hamming_equals_bitwise_reference(n_bits, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(7, 16, generator=gen)
    planes = resv.make_planes(16, n_bits, seed)
    codes = resv.hash_codes(keys, planes)
    assert codes.shape == (7, math.ceil(n_bits / 32))
    bits = _bits_reference(keys, planes)
    ref = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    assert torch.equal(resv.hamming(codes[:, None], codes[None]), ref)


def test_popcount_edge_values():
    x = torch.tensor([0, 1, 0xFFFFFFFF, 0x80000000, 0x55555555], dtype=torch.int64)
    assert resv.popcount(x).tolist() == [0, 1, 32, 1, 16]


def _bit_count(word: int) -> int:
    return bin(word & (2**64 - 1)).count("1")  # the 64 bits of an int64, two's complement


def test_popcount_and_hamming_count_all_64_bits_of_a_word():
    # words packed 64 bits each (not by hash_codes): negative values, the sign bit, the extremes
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**63), 2**63 - 1, (40, 3), generator=gen, dtype=torch.int64)
    edges = torch.tensor([0, -1, -(2**63), 2**63 - 1, 2**32, -(2**32), 0xFFFFFFFF], dtype=torch.int64)
    x = torch.cat([words.flatten(), edges])
    assert resv.popcount(x).tolist() == [_bit_count(w) for w in x.tolist()]
    rows = words.tolist()
    ref = [[sum(_bit_count(p ^ q) for p, q in zip(r, s, strict=True)) for s in rows] for r in rows]
    assert resv.hamming(words[:, None], words[None]).tolist() == ref


def test_hash_codes_are_sign_bits_and_seeded():
    planes = resv.make_planes(4, 3, seed=5)
    assert torch.equal(planes, resv.make_planes(4, 3, seed=5))
    assert not torch.equal(planes, resv.make_planes(4, 3, seed=6))
    keys = planes[:, 0:1].T  # along the first plane: bit 0 set
    assert int(resv.hash_codes(keys, planes)[0, 0]) & 1 == 1
    assert int(resv.hash_codes(-keys, planes)[0, 0]) & 1 == 0


def test_hamming_bad_input():
    with pytest.raises(ValueError, match="int64"):
        resv.hamming(torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64 tensor of packed codes .*, got a torch.int32 tensor"):
        resv.hamming(torch.zeros(2, 1, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="popcount takes an int64 tensor, got a torch.uint8"):
        resv.popcount(torch.zeros(3, dtype=torch.uint8))


# -- HC table -------------------------------------------------------------------------------
def _stream(steps, hkv, tokens, d, seed=0, noise=0.05):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(hkv, tokens, d, generator=gen)
    out = []
    for i in range(steps):
        if i % 4 == 3:
            base = torch.randn(hkv, tokens, d, generator=gen)  # scene cut
        out.append(base + noise * torch.randn(hkv, tokens, d, generator=gen))
    return out


def _sequential_reference(table_cfg, steps, hkv, d):
    """Token-by-token leader clustering, written plainly, for one group."""
    assert table_cfg.scope == "all_heads" and table_cfg.similarity_floor is None
    planes = resv.make_planes(hkv * d, table_cfg.n_bits, table_cfg.seed * 1_000_003 + 0 * 1_009)
    codes: list[torch.Tensor] = []
    counts: list[int] = []
    assignment = []
    for keys in steps:
        flat = keys.transpose(0, 1).reshape(keys.shape[1], -1)
        step_codes = resv.hash_codes(flat, planes)
        start_counts = list(counts)
        for t in range(flat.shape[0]):
            best, best_d = None, None
            for c, code in enumerate(codes):
                cap = table_cfg.max_cluster_tokens
                if c < len(start_counts) and cap is not None and start_counts[c] >= cap:
                    continue
                dist = int(resv.hamming(step_codes[t], code))
                if dist < table_cfg.hamming_threshold and (best_d is None or dist < best_d):
                    best, best_d = c, dist
            if best is None:
                codes.append(step_codes[t])
                counts.append(1)
                assignment.append(len(codes) - 1)
            else:
                counts[best] += 1
                assignment.append(best)
    return assignment


@pytest.mark.parametrize("cap", [None, 3])
@pytest.mark.parametrize("threshold", [3, 7, 12])
def test_vectorised_clustering_matches_sequential(threshold, cap):
    hkv, d, tokens = 2, 8, 12
    cfg = resv.ResvConfig(n_bits=32, hamming_threshold=threshold, max_cluster_tokens=cap)
    steps = _stream(6, hkv, tokens, d)
    table = resv.HCTable(hkv, d, cfg, layer=0)
    got = torch.cat([table.add(k).cluster_ids[0] for k in steps]).tolist()
    assert got == _sequential_reference(cfg, steps, hkv, d)


@pytest.mark.parametrize(
    "cfg",
    [
        resv.PAPER,
        resv.DEFAULT,
        resv.ResvConfig(scope="per_head", hamming_threshold=5),
        resv.ResvConfig(similarity_floor=0.5, max_cluster_tokens=4, estimator="bound"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_hc_table_invariants(cfg, device):
    hkv, d, tokens = 3, 16, 10
    steps = _stream(8, hkv, tokens, d, seed=1)
    table = resv.HCTable(hkv, d, cfg, layer=2, device=device)
    ids = torch.cat([table.add(k.to(device)).cluster_ids for k in steps], 1).cpu()  # [Hkv, N]
    keys = torch.cat(steps, 1)  # [Hkv, N, d]
    n = keys.shape[1]
    assert table.num_tokens == n
    counts = table.counts.view.cpu()
    means = table.means().cpu()
    codes = table.codes.view.cpu()
    for g in range(table.groups):
        heads = list(range(g * table.heads_per_group, (g + 1) * table.heads_per_group))
        member = table.member_of.view[g].cpu()
        assert torch.equal(member, ids[heads[0]])
        # every token in exactly one cluster; counts sum to tokens
        assert int(counts[g].sum()) == n
        assert torch.equal(torch.bincount(member, minlength=table.num_clusters), counts[g])
        # within threshold of its cluster's code
        flat = keys[heads].transpose(0, 1).reshape(n, -1)
        tok_codes = resv.hash_codes(flat, table.planes[g].cpu())
        dist = resv.hamming(tok_codes, codes[g][member])
        assert bool((dist < cfg.hamming_threshold).all())
        # representative key = mean of members
        for c in member.unique():
            rows = keys[heads][:, member == c]  # [Hg, m, d]
            assert torch.allclose(means[g, c], rows.mean(1), atol=1e-5)
        # CSR lists each cluster's tokens
        offsets, order = (x.cpu() for x in table.members())
        for c in member.unique()[:5]:
            toks = order[g, offsets[g, c] : offsets[g, c + 1]]
            assert torch.equal(toks, (member == c).nonzero().squeeze(1))


def test_floor_keeps_an_outlier_alone():
    hkv, d = 1, 16
    base = torch.randn(1, 1, d)
    near = base + 0.01 * torch.randn(1, 8, d)
    table = resv.HCTable(hkv, d, resv.ResvConfig(hamming_threshold=33, similarity_floor=0.9), 0)
    ids = table.add(torch.cat([near, -base], 1)).cluster_ids[0]
    assert len(set(ids[:8].tolist())) == 1 and ids[8] != ids[0]


def test_hc_overhead_fraction_matches_paper_shape():
    # 32 tokens per cluster, bf16 KV: representative keys cost 1/64 of K+V, plus codes and indices
    table = resv.HCTable(8, 128, resv.ResvConfig(hamming_threshold=33), 0)
    for _ in range(4):
        table.add(torch.ones(8, 8, 128))
    assert table.num_clusters == 1 and table.num_tokens == 32
    frac = table.overhead_fraction(kv_dtype_bytes=2)
    assert 1 / 64 < frac < 0.02


def test_state_dict_roundtrip_continues_identically():
    cfg = resv.DEFAULT
    steps = _stream(6, 3, 8, 16, seed=3)
    a = resv.HCTable(3, 16, cfg, 1)
    for k in steps[:3]:
        a.add(k)
    b = resv.HCTable(3, 16, cfg, 1)
    b.load_state_dict(a.state_dict())
    for k in steps[3:]:
        assert torch.equal(a.add(k).cluster_ids, b.add(k).cluster_ids)


# -- selectors ------------------------------------------------------------------------------
def _feed(sel, layers, steps):
    for keys in steps:
        for layer in range(layers):
            sel.observe(layer, keys)


@pytest.mark.parametrize("policy", resv.POLICIES)
def test_selectors_always_attend_sinks_and_recent(policy):
    cfg = resv.SelectorConfig(
        policy=policy, sink_tokens=2, recent_tokens=5, budget_fraction=0.2, resv=resv.PAPER
    )
    sel = resv.make_selector(2, 6, 3, 16, cfg)
    steps = _stream(5, 3, 10, 16)
    _feed(sel, 2, steps)
    out = sel.select(1, torch.randn(6, 4, 16), 50, 0.25)
    assert out.token_mask.shape == (3, 50)
    assert bool(out.token_mask[:, :2].all()) and bool(out.token_mask[:, -5:].all())
    if policy == "full":
        assert out.fetched_fraction() == 1.0
    elif policy == "window":
        assert int(out.selected_tokens[0]) == 7
    else:
        assert 7 / 50 <= out.fetched_fraction() < 1.0


def test_resv_selects_cluster_of_a_needle_query():
    d = 16
    gen = torch.Generator().manual_seed(0)
    sel = resv.make_selector(1, 2, 1, d, resv.SelectorConfig(sink_tokens=0, recent_tokens=0))
    base = torch.randn(1, 8, d, generator=gen)
    hay = [base + 0.02 * torch.randn(1, 8, d, generator=gen) for _ in range(10)]
    needle = torch.zeros(1, 1, d)
    needle[0, 0, 0] = 10.0
    hay[4] = torch.cat([hay[4][:, :7], needle], 1)
    _feed(sel, 1, hay)
    query = torch.zeros(2, 1, d)
    query[:, 0, 0] = 3.0
    out = sel.select(0, query, 80, d**-0.5)
    assert bool(out.token_mask[0, 4 * 8 + 7])
    assert out.fetched_fraction() < 0.5
    assert int(out.clusters[0]) < 20  # near-copies share clusters


def _sink_heavy_stream(d: int = 16):
    """Sinks that match the query far better than anything else, then distinct retrievable
    clusters of graded relevance (one per step)."""
    sink = torch.zeros(1, 4, d)
    sink[0, :, 0] = 12.0
    steps = [sink]
    for i in range(8):
        k = torch.zeros(1, 6, d)
        k[0, :, 1 + i] = 4.0  # its own direction: one cluster per step
        k[0, :, 0] = 3.0 - 0.3 * i
        steps.append(k)
    steps.append(torch.randn(1, 4, d, generator=torch.Generator().manual_seed(1)))  # the window
    query = torch.zeros(2, 1, d)
    query[:, 0, 0] = 1.0
    return steps, query


@pytest.mark.parametrize("mass", ["all", "retrievable"])
def test_resv_ratio_mass(mass):
    d = 16
    steps, query = _sink_heavy_stream(d)
    cfg = resv.ResvConfig(
        scope="per_head", hamming_threshold=2, similarity_floor=0.99, decode_ratio=0.6, mass=mass
    )
    sel = resv.make_selector(1, 2, 1, d, resv.SelectorConfig(sink_tokens=4, recent_tokens=4, resv=cfg))
    _feed(sel, 1, steps)
    out = sel.select(0, query, 56, 1.0)
    extra = out.token_mask[0, 4:52]  # neither sink nor window
    if mass == "all":
        # the sink cluster alone passes 60% of all the mass: nothing else is fetched
        assert not bool(extra.any())
    else:
        # 60% of the retrievable mass: the most relevant step first, never a lesser one alone
        assert bool(extra[:6].all()) and not bool(extra.all())
        picked = extra.view(8, 6).all(1).tolist()
        assert picked == sorted(picked, reverse=True)
        assert int(out.selected_clusters[0]) == sum(picked)  # no sink-only cluster counted


def test_resv_ratio_by_rows_and_stage():
    cfg = resv.ResvConfig(frame_ratio=0.5, decode_ratio=0.97, text_ratio=0.9)
    assert cfg.ratio_for(1) == cfg.ratio_for(1, "text") == 0.97  # one row: decode, whatever the stage
    assert cfg.ratio_for(67, "frame") == cfg.ratio_for(67) == 0.5
    assert cfg.ratio_for(12, "text") == 0.9
    assert cfg.replace(text_ratio=None).ratio_for(12, "text") == 0.5  # unset: split by rows only
    with pytest.raises(ValueError, match="text_ratio"):
        resv.ResvConfig(text_ratio=0.0)

    # a selector uses the text ratio only when told the step is text
    d = 16
    steps, query = _sink_heavy_stream(d)
    rows = query.expand(2, 3, d).clone()
    cfg = resv.ResvConfig(
        scope="per_head", hamming_threshold=2, similarity_floor=0.99, frame_ratio=0.6, text_ratio=1.0
    )
    sel = resv.make_selector(1, 2, 1, d, resv.SelectorConfig(sink_tokens=4, recent_tokens=4, resv=cfg))
    _feed(sel, 1, steps)
    as_frame = sel.select(0, rows, 56, 1.0, "frame").token_mask
    as_text = sel.select(0, rows, 56, 1.0, "text").token_mask
    assert torch.equal(as_frame, sel.select(0, rows, 56, 1.0).token_mask)
    assert not bool(as_frame[0, 4:52].any()) and bool(as_text.all())


def test_resv_config_mass_is_checked():
    with pytest.raises(ValueError, match="mass"):
        resv.ResvConfig(mass="most")


def test_selector_bad_arguments():
    with pytest.raises(ValueError, match="policy"):
        resv.SelectorConfig(policy="magic")
    sel = resv.make_selector(2, 6, 3, 8, "resv")
    with pytest.raises(ValueError, match="layer"):
        sel.observe(5, torch.zeros(3, 1, 8))
    with pytest.raises(ValueError, match="query"):
        sel.select(0, torch.zeros(5, 1, 8), 0, 1.0)
    with pytest.raises(ValueError, match="preset"):
        resv.preset("nope")
    with pytest.raises(ValueError, match="hamming_threshold"):
        resv.ResvConfig(hamming_threshold=0)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("n_bits", 32.5, "n_bits must be a whole number"),
        ("n_bits", True, "n_bits must be a whole number"),
        ("n_bits", 4, "hamming_threshold must be in [1, n_bits + 1 = 5]"),
        ("hamming_threshold", 2.5, "hamming_threshold must be a whole number"),
        ("max_cluster_tokens", float("nan"), "max_cluster_tokens must be a whole number"),
        ("similarity_floor", "0.9", "similarity_floor must be a number"),
        ("frame_ratio", None, "frame_ratio must be a number"),
        ("num_buckets", 10**9, "num_buckets must be in [1, 65536]"),
        ("seed", 2**70, "seed must be in"),
    ],
)
def test_resv_config_names_the_field_and_its_range(field, value, words):
    with pytest.raises(ValueError) as err:
        resv.ResvConfig(**{field: value})
    assert words in str(err.value)


@pytest.mark.parametrize("policy", resv.POLICIES)
def test_a_refused_observe_changes_nothing(policy):
    sel = resv.make_selector(2, 4, 2, 16, policy)
    before = sel.state_dict()
    for layer, keys in ((-1, torch.randn(2, 7, 16)), (5, torch.randn(2, 7, 16)), (0, torch.randn(7, 2, 16))):
        with pytest.raises(ValueError, match="layer|keys"):
            sel.observe(layer, keys)
    after = sel.state_dict()
    assert after["steps"] == before["steps"] == [0, 0]
    if "keys" in after:
        assert all(k.shape[1] == 0 for k in after["keys"])
    assert sel.observe(0, torch.randn(2, 0, 16)).shape == (2, 0)  # an empty step is fine


@pytest.mark.parametrize("policy", resv.POLICIES)
def test_select_argument_errors_name_the_argument(policy):
    sel = resv.make_selector(1, 4, 2, 16, policy)
    sel.observe(0, torch.randn(2, 10, 16))
    with pytest.raises(ValueError, match=r"query must be \[4, Tq, 16\]"):
        sel.select(0, torch.randn(4, 1, 19), 10, 0.25)
    with pytest.raises(ValueError, match="history_len must be >= 0"):
        sel.select(0, torch.randn(4, 1, 16), -1, 0.25)
    with pytest.raises(ValueError, match="stage must be one of"):
        sel.select(0, torch.randn(4, 1, 16), 10, 0.25, "bogus")
    if policy in ("topk", "rekv", "resv"):
        with pytest.raises(ValueError, match="history"):
            sel.select(0, torch.randn(4, 1, 16), 11, 0.25)
    assert sel.select(0, torch.randn(4, 0, 16), 10, 0.25).token_mask.shape == (2, 10)  # no query rows


def test_make_selector_takes_a_resv_config_and_presets_by_name():
    assert resv.make_selector(1, 4, 2, 16, resv.PAPER).resv == resv.PAPER
    assert resv.make_selector(1, 4, 2, 16, None).resv == resv.DEFAULT
    assert resv.SelectorConfig(resv="paper").resv == resv.PAPER
    with pytest.raises(ValueError, match="config must be"):
        resv.make_selector(1, 4, 2, 16, 3)
    with pytest.raises(ValueError, match="num_kv_heads must be a whole number >= 1"):
        resv.make_selector(1, 4, 0, 16)


def test_state_of_another_config_or_policy_is_refused():
    paper = resv.make_selector(1, 4, 2, 16, resv.PAPER)
    paper.observe(0, torch.randn(2, 5, 16))
    state = paper.state_dict()
    with pytest.raises(ValueError, match="hyperplanes"):
        resv.make_selector(1, 4, 2, 16, resv.PAPER.replace(n_bits=16, hamming_threshold=3)).load_state_dict(
            state
        )
    with pytest.raises(ValueError, match="key bounds"):
        resv.make_selector(1, 4, 2, 16, resv.PAPER.replace(estimator="bound")).load_state_dict(state)
    with pytest.raises(ValueError, match="another policy"):
        resv.make_selector(1, 4, 2, 16, "topk").load_state_dict(state)
    with pytest.raises(ValueError, match="layers"):
        resv.make_selector(2, 4, 2, 16, resv.PAPER).load_state_dict(state)


def test_a_long_step_is_clustered_in_chunks():
    from vrex.resv.clusters import MAX_STEP_TOKENS

    keys = torch.randn(2, MAX_STEP_TOKENS + 5, 16)
    whole = resv.HCTable(2, 16, resv.DEFAULT, 0)
    ids = whole.add(keys).cluster_ids
    chunked = resv.HCTable(2, 16, resv.DEFAULT, 0)
    chunked.add(keys[:, :MAX_STEP_TOKENS])
    chunked.add(keys[:, MAX_STEP_TOKENS:])
    assert ids.shape == (2, MAX_STEP_TOKENS + 5) and whole.num_tokens == MAX_STEP_TOKENS + 5
    assert torch.equal(whole.member_of.view, chunked.member_of.view)  # the same as two steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cpu_and_cuda_agree():
    steps = _stream(6, 3, 10, 16, seed=7)
    results = []
    for device in ("cpu", "cuda"):
        sel = resv.make_selector(1, 6, 3, 16, resv.SelectorConfig(resv=resv.DEFAULT), device=device)
        ids = [sel.observe(0, k.to(device)).cpu() for k in steps]
        q = torch.randn(6, 4, 16, generator=torch.Generator().manual_seed(1)).to(device)
        results.append((ids, sel.select(0, q, 60, 0.25).token_mask.cpu()))
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0], strict=True))
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("heads, history", [(3, 50), (1, 7), (4, 0), (2, 5)])
def test_selection_positions_are_each_heads_sorted_hits_on_the_host(heads, history):
    from vrex.resv.selectors import Selection

    mask = torch.rand(heads, history, generator=torch.Generator().manual_seed(heads)) < 0.4
    if history:
        mask[0] = False  # a head that selects nothing still gets its (empty) entry
    got = Selection(token_mask=mask).positions()
    assert len(got) == heads
    for row, pos in zip(mask, got, strict=True):
        assert pos.device.type == "cpu" and torch.equal(pos, row.nonzero().squeeze(1))
