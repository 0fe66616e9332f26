"""Smoke tests of `vrex bench fidelity` and `vrex bench latency` on a tiny random model."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

import vrex.resv as resv
from benchmarks import cli as bench_cli
from benchmarks import fidelity, latency
from vrex.engine import Engine, EngineConfig, SessionSettings
from vrex.models import tiny_random


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    eng = Engine(EngineConfig(model_dir=str(tiny_random("smolvlm", seed=0))))
    yield eng
    eng.shutdown()


def _frames(engine, n: int) -> list:
    rng = np.random.default_rng(0)
    return [engine.adapter.frame_embeds(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_teacher_forcing_full_on_full_agrees_exactly(engine):
    frames = _frames(engine, 4)
    full = fidelity.Variant("full", "full")
    ref = fidelity.run_video_stream(engine, full, frames, [2, 4], None, 4, False)
    assert len(ref["answers"]) == 2
    again = fidelity.run_video_stream(engine, full, frames, [2, 4], ref["answers"], 4, False)
    assert again["answer_tokens"] == sum(len(ids) for ids, _ in ref["answers"]) > 0
    assert again["agreement"] == 1.0
    assert abs(again["kl"]) < 1e-5


def test_restricted_selectors_report_fractions_and_errors(engine):
    frames = _frames(engine, 6)
    full = fidelity.Variant("full", "full")
    ref = fidelity.run_video_stream(engine, full, frames, [6], None, 3, False)
    # recent window of 1 token: the frames before the last are not fetched, so attention output differs
    narrow = fidelity.Variant("window", "window", recent_tokens=1)
    res = fidelity.run_video_stream(engine, narrow, frames, [6], ref["answers"], 3, True)
    assert res["tally"].fraction("frame") < 0.9  # the byte-level system prompt (sinks) is most of it
    assert len(res["layer_error"]) == engine.adapter.num_layers
    assert max(res["layer_error"]) > 1e-3
    grid = res["tally"].per_layer_head("frame")
    assert len(grid) == engine.adapter.num_layers and len(grid[0]) == engine.adapter.num_kv_heads
    # ReSV at ratio 1.0 keeps every cluster: everything is fetched and the answer matches full
    whole = fidelity.Variant("resv-1", "resv", resv.DEFAULT.replace(frame_ratio=1.0, decode_ratio=1.0))
    res1 = fidelity.run_video_stream(engine, whole, frames, [6], ref["answers"], 3, True)
    assert res1["tally"].fraction("frame") == pytest.approx(1.0)
    assert res1["agreement"] == 1.0 and max(res1["layer_error"]) < 1e-4


def test_needle_counts_only_trials_full_attention_solves(engine):
    variants = [fidelity.Variant("full", "full"), fidelity.Variant("resv", "resv")]
    rows, raw = fidelity.run_needle(engine, variants, 2, [192], 32, 0, lambda msg: None)
    full_raw = [r for r in raw if r["policy"] == "full"]
    assert len(full_raw) == 2 and all(r["history_tokens"] >= 192 for r in full_raw)
    solved = {r["trial"] for r in full_raw if r["found"]}
    assert {r["trial"] for r in raw if r["policy"] == "resv"} == solved
    by = {r["policy"]: r for r in rows}
    assert by["full"]["trials"] == 2 and by["full"]["trials_full_found"] == len(solved)


def test_needle_sweep_stops_a_setting_once_its_verdict_is_settled(engine, monkeypatch):
    """With min_depths=2 of 3 bins, a setting that missed in two bins runs no more trials."""
    calls = []

    def fake_trial(engine, v, filler, key, depth, chunk_tokens, offset, history):
        calls.append(v.name)
        found = v.name == "full" or (v.name == "good")
        return {
            "found": found,
            **{k: 0.5 for k in ("fetched_fraction_frame", "fetched_fraction_text")},
            **{k: 0.5 for k in ("fetched_fraction_decode", "fetched_fraction_answer")},
            "bytes_fetched": 1,
            "prefill_s": 0.0,
            "history_tokens": history,
        }

    monkeypatch.setattr(fidelity, "needle_trial", fake_trial)
    variants = [fidelity.Variant(n, p) for n, p in (("full", "full"), ("good", "resv"), ("bad", "resv"))]
    fidelity.run_needle(engine, variants, 6, [256], 32, 0, lambda m: None, min_depths=2)
    assert calls.count("good") == 6 and calls.count("bad") == 2  # two bins missed: settled


def test_needle_target_compares_bytes_with_the_cheapest_exact_rekv():
    def row(policy, acc, nbytes):
        return {
            "part": "needle",
            "policy": policy,
            "history_tokens": 2048,
            "accuracy": acc,
            "bytes_fetched": nbytes,
            "trials_full_found": 4,
        }

    rows = [row("resv", 1.0, 10), row("rekv", 0.0, 5), row("rekv-b0.25", 1.0, 40), row("rekv-b0.5", 1.0, 80)]
    (t,) = fidelity.needle_targets(rows)
    assert t["rekv_policy_at_equal_accuracy"] == "rekv-b0.25"
    assert t["bytes_ratio_rekv_over_resv"] == 4.0 and t["met"]
    rows[0]["accuracy"] = 0.75  # ReSV lost a key: no saving counts
    assert not fidelity.needle_targets(rows)[0]["met"]


def test_default_rule_picks_fewest_bytes_that_keep_needle_and_agreement():
    def needle(policy, accs, nbytes):
        row = {
            "policy": policy,
            "history_tokens": 1024,
            "accuracy": sum(accs) / 3,
            "bytes_fetched": nbytes,
            "fetched_fraction_frame": 0.1,
            "fetched_fraction_decode": 0.1,
        }
        for b, a in enumerate(accs):
            row[f"accuracy_depth{b}"], row[f"counted_depth{b}"] = a, 1
        return row

    def video(policy, agreement):
        return {
            "policy": policy,
            "video": "all",
            "agreement": agreement,
            "kl_mean_nats": 0.01,
            "fetched_fraction_frame": 0.2,
            "fetched_fraction_decode": 0.1,
            "bytes_fetched": 0,
        }

    needles = [
        needle("full", [1, 1, 1], 100),
        needle("resv:cheap-but-loses", [1, 0, 0], 10),  # one depth only
        needle("resv:low-agreement", [1, 1, 1], 20),
        needle("resv:good", [1, 1, 0], 40),
        needle("resv:good-but-costly", [1, 1, 1], 60),
    ]
    videos = [
        video("resv:cheap-but-loses", 1.0),
        video("resv:low-agreement", 0.9),
        video("resv:good", 0.995),
        video("resv:good-but-costly", 1.0),
    ]
    winner, verdicts = fidelity.choose_default(needles, videos)
    assert winner == "resv:good"
    assert [v["passes_rule"] for v in verdicts] == [False, False, True, True]


def test_budget_plot_is_written(tmp_path):
    rows = [
        {"policy": p, "video": "all", "fetched_fraction_answer": f, "kl_mean_nats": k, "agreement": a}
        for p, f, k, a in [
            ("resv-r0.3", 0.2, 0.1, 0.8),
            ("resv-r0.9", 0.5, 0.01, 1.0),
            ("topk-b0.1", 0.3, 0.05, 0.9),
        ]
    ]
    path = fidelity.plot_budget(rows, str(tmp_path / "plot.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("source", ["synthetic", "recorded"])
def test_latency_rows_have_phases_tiers_and_targets(engine, tmp_path, source):
    args = argparse.Namespace(
        history_source=source,
        record_cache=str(tmp_path / "cache"),
        record_fps=6.0,
        history=[1280],
        quick=False,
        policy=["full", "resv"],
        steps=2,
        device_fraction=0.25,
        host_fraction=0.25,
        seed=0,
        data_dir=str(tmp_path),
        raw=None,
        model=None,
        device="cpu",
        block_tokens=[8, 4] if source == "recorded" else None,
    )
    rows = latency.run(args, adapter=engine.adapter)
    first = rows[0]["block_tokens"]
    assert first == (8 if source == "recorded" else EngineConfig.block_tokens)
    if source == "recorded":  # block sizes side by side: each row compared within its own size
        small = {r["policy"]: r for r in rows if r.get("block_tokens") == 4}
        assert set(small) == {"full", "resv"}
        assert small["resv"]["speedup_vs_full"] == small["full"]["step_ms"] / small["resv"]["step_ms"]
    points = {r["policy"]: r for r in rows if "step_ms" in r and r["block_tokens"] == first}
    assert set(points) == {"full", "resv"}
    full = points["full"]
    assert full["fetched_fraction"] == 1.0
    assert full["history_tokens"] >= 1024
    # device holds a quarter, host a quarter: a full fetch reads from all three tiers
    assert (
        full["bytes_device_per_step"] > 0
        and full["bytes_host_per_step"] > 0
        and full["bytes_disk_per_step"] > 0
    )
    assert full["peak_resident_bytes_device"] <= full["budget_bytes_device"]
    for r in points.values():
        phases = sum(r[k] for k in ("select_ms", "fetch_ms", "attention_ms", "store_ms", "mlp_and_rest_ms"))
        assert phases == pytest.approx(r["step_ms"], rel=0.05)
        assert r["step_ms_max"] >= r["step_ms"] and r["store_ms_max"] >= r["store_ms"]
    assert {r["target"] for r in rows if "target" in r} >= {"resv selection <= 10% of the step"}


def test_recorded_history_is_the_models_own_kv_and_is_cached(engine, tmp_path):
    a = engine.adapter
    rec = latency.record_history(a, 200, tmp_path, fps=6.0)
    assert sum(rec.sizes) >= 200 and rec.keys.shape[2] == sum(rec.sizes)
    meta = next(tmp_path.glob("*/meta.json"))
    stamp = meta.stat().st_mtime_ns
    again = latency.record_history(a, 150, tmp_path, fps=6.0)  # shorter: a prefix of the cache
    assert meta.stat().st_mtime_ns == stamp and again.sizes == rec.sizes
    # the first recorded frame is what a fresh full-attention session stores for that frame
    session = engine.open_session(SessionSettings(policy="full", fps=120))
    try:
        session._step(next(latency._video_frames(a, 6.0)), "frame")
        k, v = session.store.fetch_all(a.num_layers - 1)
        n = rec.sizes[0]
        keys, values = latency.RecordedStream(rec.keys, rec.values, rec.sizes).next_frame()
        assert keys.shape[2] == n
        p = session.prefix_tokens
        torch.testing.assert_close(keys[-1].float(), k[:, p : p + n].float(), atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(values[-1].float(), v[:, p : p + n].float(), atol=2e-2, rtol=1e-2)
    finally:
        engine.close_session(session.id, forget=True)


def test_cli_registers_both_subcommands():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    bench_cli.register_fidelity(sub)
    bench_cli.register_latency(sub)
    ns = parser.parse_args(["fidelity", "--quick", "--part", "needle", "--json"])
    assert ns.quick and ns.part == ["needle"] and callable(ns.func)
    ns = parser.parse_args(["latency", "--history", "1000", "--policy", "resv"])
    assert ns.history == [1000] and ns.policy == ["resv"]


def test_needle_raw_files_merge_across_seeds_and_variants_filter(tmp_path):
    def trial(policy, seed, found, fetched):
        return {
            "policy": policy, "seed": seed, "trial": 0, "history": 2048, "depth_bin": 0, "found": found,
            "fetched_fraction_frame": fetched, "fetched_fraction_text": fetched,
            "fetched_fraction_decode": fetched, "fetched_fraction_answer": fetched, "bytes_fetched": 100,
        }  # fmt: skip

    runs = {
        "a.jsonl": [trial("full", 0, True, 1.0), trial("resv", 0, True, 0.2)],
        "b.jsonl": [trial("full", 1, True, 1.0), trial("resv", 1, False, 0.4)],
        "c.jsonl": [trial("full", 2, False, 1.0), trial("resv", 2, True, 0.1)],  # full missed: not counted
    }
    paths = []
    for name, records in runs.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        paths.append(str(tmp_path / name))
    rows = fidelity.needle_from_raw(paths)
    resv_row = next(r for r in rows if r["part"] == "needle" and r["policy"] == "resv")
    assert resv_row["trials"] == 3 and resv_row["trials_full_found"] == 2
    assert resv_row["accuracy"] == 0.5 and abs(resv_row["fetched_fraction_frame"] - 0.3) < 1e-9
    assert {r["policy"] for r in rows if r["part"] == "needle"} == {"full", "resv"}

    picked = fidelity.pick_variants(fidelity.needle_variants(), ["resv", "rekv-b0.5"])
    assert [v.name for v in picked] == ["full", "resv", "rekv-b0.5"]
    with pytest.raises(ValueError, match="unknown variant"):
        fidelity.pick_variants(fidelity.needle_variants(), ["resv-typo"])
    # a needle-only name leaves the video part with its other picks
    assert [v.name for v in fidelity.pick_variants(fidelity.baseline_variants(), ["resv", "rekv-b0.5"])] == [
        "full",
        "resv",
    ]
