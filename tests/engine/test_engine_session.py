"""Engine: retrieval policy over the tiered store, sessions, snapshots, traces."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

import vrex.resv as resv
from vrex.engine import Engine, EngineConfig, SessionSettings, SnapshotError
from vrex.models import load_model, tiny_random
from vrex.models.tiny import FAMILIES
from vrex.trace import TraceError, read_trace, validate_step

torch.set_num_threads(1)


def _frames(n, seed=0, h=48, w=64):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def _logits_of_session(engine, settings, frames, question="what?"):
    s = engine.open_session(settings)
    for i, f in enumerate(frames):
        assert s.add_frame(f, float(i)).accepted
    logits, _, _ = s._step(engine.adapter.question_input(question), "text", last_only=False)
    return s, logits


@pytest.mark.parametrize("family", FAMILIES)
def test_full_policy_over_tiered_store_equals_one_forward(family, tmp_path):
    """Chunked prefill through the retrieval policy, with most of the history pushed to host
    and disk by a tiny device budget, gives the logits of one unchunked forward."""
    folder = tiny_random(family, folder=tmp_path / family)
    adapter = load_model(folder)
    engine = Engine(
        EngineConfig(
            model_dir=str(folder),
            device_kv_budget_bytes=20_000,
            host_kv_budget_bytes=20_000,
            data_dir=str(tmp_path / "data"),
        ),
        adapter=adapter,
    )
    settings = SessionSettings(policy="full", fps=1)
    s = engine.open_session(settings)
    steps = [adapter.prompt_prefix()]
    if engine.accepts_frames:
        for i, f in enumerate(_frames(4)):
            s.add_frame(f, float(i))
        # re-encode the same frames for the reference (the vision tower is deterministic)
        steps += [adapter.frame_embeds(f) for f in _frames(4)]
    q = adapter.question_input("what is in the video?")
    steps.append(q)
    logits, _, _ = s._step(q, "text", last_only=False)
    ref = adapter.reference_logits(steps)[:, -q.num_tokens :]
    rel = (logits - ref).abs().max() / ref.abs().max()
    assert float(rel) <= 1e-4
    st = s.stats()
    if engine.accepts_frames:
        assert st["kv_resident_tokens_disk"] > 0, "the budget should have pushed history to disk"


def test_resv_ratio_one_matches_full(tiny_smolvlm_dir):
    engine = Engine(EngineConfig(model_dir=str(tiny_smolvlm_dir)))
    frames = _frames(5, seed=1)
    _, full = _logits_of_session(engine, SessionSettings(policy="full"), frames)
    # ratio 1 keeps every cluster with positive weight: all of them under the softmax form
    every = resv.DEFAULT.replace(frame_ratio=1.0, decode_ratio=1.0)
    s, got = _logits_of_session(engine, SessionSettings(policy="resv", resv_config=every), frames)
    assert torch.allclose(got, full, rtol=1e-4, atol=1e-4)
    assert s.stats()["fetched_fraction_frame"] == pytest.approx(1.0)


def test_long_stream_stays_under_device_budget_and_retrieves_exactly(tiny_smolvlm_dir):
    budget = 150_000
    engine = Engine(
        EngineConfig(
            model_dir=str(tiny_smolvlm_dir),
            device_kv_budget_bytes=budget,
            host_kv_budget_bytes=150_000,
            block_tokens=4,
        )
    )
    s = engine.open_session(SessionSettings(policy="resv", fps=1))
    peak = 0
    for i, f in enumerate(_frames(40, seed=2, h=32, w=32)):
        s.add_frame(f, float(i))
        peak = max(peak, s.store.stats()["resident_bytes_device"])
    assert peak <= budget
    assert s.stats()["kv_resident_tokens_disk"] > 0
    # every token of every layer comes back bit-exactly from whichever tier holds it
    for layer in (0, engine.adapter.num_layers - 1):
        k_all, v_all = s.store.fetch_all(layer)
        n = s.store.length(layer)
        pos = [torch.arange(n)] * engine.adapter.num_kv_heads
        got = s.store.fetch(layer, pos)
        assert torch.equal(got.keys, k_all) and torch.equal(got.values, v_all)


def test_snapshot_restore_continues_identically(tiny_smolvlm_dir, tmp_path):
    engine = Engine(
        EngineConfig(
            model_dir=str(tiny_smolvlm_dir),
            data_dir=str(tmp_path),
            device_kv_budget_bytes=70_000,
            host_kv_budget_bytes=1 << 30,  # a host tier on the CPU too, as below a discrete GPU
        )
    )
    custom = resv.DEFAULT.replace(frame_ratio=0.5, decode_ratio=0.8, mass="retrievable")
    s = engine.open_session(SessionSettings(policy="resv", fps=1, resv_config=custom))
    assert s.policy.selector.resv == custom
    frames = _frames(8, seed=3)
    for i, f in enumerate(frames[:6]):
        s.add_frame(f, float(i))
    # the snapshot must hold pages below the device tier and ReSV clusters closed by their move
    moved = s.store.stats()["evicted_bytes_device_to_host"]
    assert moved > 0 and s.store.stats()["resident_tokens_host"] > 0
    s.snapshot()
    sid = s.id
    engine.close_session(sid)
    a = engine.resume(sid)
    assert sid in engine.list_snapshots()
    b_engine = Engine(engine.config, adapter=engine.adapter)  # another server, same budgets
    b = b_engine.resume(sid)
    assert a.settings.resv == b.settings.resv == custom  # settings no preset holds survive a snapshot
    for i, f in enumerate(frames[6:], start=6):
        ra, rb = a.add_frame(f, float(i)), b.add_frame(f, float(i))
        assert ra.accepted and rb.accepted and ra.history_tokens == rb.history_tokens
    for restored in (a, b):  # both kept moving pages down after the restore
        assert restored.store.stats()["evicted_bytes_device_to_host"] > moved
    la, _, _ = a._step(engine.adapter.question_input("q"), "text", last_only=False)
    lb, _, _ = b._step(engine.adapter.question_input("q"), "text", last_only=False)
    assert torch.equal(la, lb)
    with pytest.raises(KeyError):
        engine.resume("no-such-session")


def test_a_snapshot_set_aside_by_a_crash_mid_swap_still_resumes(tiny_smolvlm_dir, tmp_path):
    """A snapshot replaces the last one with two renames (old aside, new into place); a crash
    between them leaves only the set-aside copy. Resume finds it (it answered no session), and
    the next snapshot clears it away."""
    engine = Engine(EngineConfig(model_dir=str(tiny_smolvlm_dir), data_dir=str(tmp_path)))
    s = engine.open_session(SessionSettings(policy="resv", fps=1))
    for i, f in enumerate(_frames(3, seed=5)):
        s.add_frame(f, float(i))
    s.snapshot()
    sid, history = s.id, s.history_tokens
    engine.close_session(sid)
    folder = engine.snapshot_dir(sid)
    aside = folder.with_name(f".{sid}.old-abc123def456")
    folder.rename(aside)
    restored = engine.resume(sid)
    assert restored.history_tokens == history
    restored.snapshot()
    assert (folder / "session.json").exists() and not aside.exists()
    # a snapshot folder without its session.json is damage (DATA_LOSS), not a missing session
    engine.close_session(sid)
    (folder / "session.json").unlink()
    with pytest.raises(SnapshotError, match="session.json is missing"):
        engine.resume(sid)


def test_sampler_keeps_target_fps_and_reports_drops(tiny_smolvlm_dir):
    engine = Engine(EngineConfig(model_dir=str(tiny_smolvlm_dir)))
    s = engine.open_session(SessionSettings(policy="window", fps=2))
    frame = _frames(1)[0]
    kept = [s.add_frame(frame, t / 10).accepted for t in range(20)]  # 10 fps for 2 s
    assert sum(kept) == 4
    st = s.stats()
    assert st["frames_dropped"] == 16 and "above the session's target fps" in st["drop_reasons"]
    assert st["last_frame_ts"] == 1.5  # what a resuming client continues after
    assert not s.add_frame(frame, 0.0).accepted  # backwards


def test_sampler_keeps_every_frame_a_client_sampler_picked(tiny_smolvlm_dir):
    from vrex.video import FpsSampler

    # a 25 fps file read at 2 fps: the client keeps 0.0, 0.52, 1.0, 1.52, ... (first of each
    # 0.5 s slot); a minimum-gap sampler would drop 1.0 (0.48 s after 0.52)
    picker = FpsSampler(2.0)
    picks = [t / 25 for t in range(75) if picker.keep(t / 25)]
    assert picks[:3] == [0.0, 0.52, 1.0]
    engine = Engine(EngineConfig(model_dir=str(tiny_smolvlm_dir)))
    s = engine.open_session(SessionSettings(policy="window", fps=2))
    frame = _frames(1)[0]
    assert all(s.add_frame(frame, t).accepted for t in picks)


def test_ask_streams_multi_turn_and_trace_validates(tiny_smolvlm_dir, tmp_path):
    engine = Engine(EngineConfig(model_dir=str(tiny_smolvlm_dir)))
    trace = tmp_path / "t.jsonl"
    s = engine.open_session(SessionSettings(policy="resv", fps=1, max_new_tokens=4), trace_path=str(trace))

    async def go():
        for i, f in enumerate(_frames(3)):
            assert (await s.submit_frame(f, float(i))).accepted
        first = [d async for d in s.ask("what?")]
        second = [d async for d in s.ask("and now?", temperature=0.7, top_p=0.9)]
        return first, second

    first, second = asyncio.run(go())
    st = s.stats()
    assert st["answers"] == 2
    assert 0 < st["fetched_fraction_text"] <= 1
    per_lh = st["fetched_fraction_per_layer_head"]
    assert set(per_lh) >= {"frame", "decode"}
    assert len(per_lh["frame"]) == engine.adapter.num_layers
    assert all(
        len(row) == engine.adapter.num_kv_heads and all(0 <= f <= 1 for f in row) for row in per_lh["frame"]
    )
    assert s.answers[0].tokens <= 4 and s.answers[0].finish_reason in ("length", "stop")
    s.close()
    header, steps = read_trace(trace)
    steps = list(steps)
    assert header["model"]["num_layers"] == engine.adapter.num_layers
    stages = [r["stage"] for r in steps]
    assert stages.count("frame") == 3 and "decode" in stages
    frame = next(r for r in steps if r["stage"] == "frame" and r["history_tokens"] > 0)
    assert len(frame["layers"]) == engine.adapter.num_layers
    assert frame["layers"][0]["heads"][0]["clusters"] > 0
    bad = json.loads(json.dumps(frame))
    bad["layers"][0]["heads"][0]["selected_tokens"] = 10**9
    with pytest.raises(TraceError, match="selected_tokens"):
        validate_step(bad)


@pytest.mark.parametrize("how", ["cancelled", "error"])
def test_an_answer_cut_short_closes_its_turn(tiny_smolvlm_dir, monkeypatch, how):
    """An answer that stops early (the caller stops reading, or sampling fails) leaves the
    history as a finished answer of the tokens it fed back would: the next step is the same."""
    engine = Engine(EngineConfig(model_dir=str(tiny_smolvlm_dir)))
    settings = SessionSettings(policy="resv", fps=1, max_new_tokens=32, temperature=1.0)
    frames = _frames(2, seed=3)

    def opened():
        s = engine.open_session(settings)
        for i, f in enumerate(frames):
            assert s.add_frame(f, float(i)).accepted
        return s

    cut = opened()
    if how == "cancelled":
        it = cut.generate("what?")
        deltas = [next(it) for _ in range(3)]
        it.close()  # the tokens before the last delta's were fed back; its own was not
        stop_at = deltas[-1].index + 1
    else:
        from vrex.engine import session as session_mod

        calls = {"n": 0}
        real = session_mod._sample

        def failing(*args):
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("sampler broke")
            return real(*args)

        monkeypatch.setattr(session_mod, "_sample", failing)
        with pytest.raises(RuntimeError, match="sampler broke"):
            list(cut.generate("what?"))
        monkeypatch.setattr(session_mod, "_sample", real)
        stop_at = 5
    assert cut.answers[-1].finish_reason == how
    assert len(cut.answers[-1].history_token_ids) == stop_at - 1
    assert cut.stats()["answers"] == 1

    whole = opened()
    list(whole.generate("what?", max_new_tokens=stop_at))
    assert whole.answers[-1].history_token_ids == cut.answers[-1].history_token_ids
    _assert_same_next_step(engine, cut, whole)


def _assert_same_next_step(engine, a, b):
    """Two sessions hold the same history: equal lengths, and equal logits for a next question."""
    assert a.history_tokens == b.history_tokens
    q = engine.adapter.question_input("and then?")
    got, _, _ = a._step(q, "text", last_only=False)
    want, _, _ = b._step(q, "text", last_only=False)
    assert torch.equal(got, want)


def test_ask_closed_early_closes_the_turn_on_the_model_thread(tiny_smolvlm_dir, monkeypatch):
    import threading

    engine = Engine(EngineConfig(model_dir=str(tiny_smolvlm_dir)))
    s = engine.open_session(SessionSettings(policy="resv", fps=1, max_new_tokens=32, temperature=1.0))
    closed_on = []
    real = engine.adapter.next_turn_input

    def spy():
        closed_on.append(threading.current_thread().name)
        return real()

    monkeypatch.setattr(engine.adapter, "next_turn_input", spy)

    async def go():
        assert (await s.submit_frame(_frames(1)[0], 0.0)).accepted
        stream = s.ask("what?")
        await stream.__anext__()
        await stream.aclose()  # what a server does when its client disconnects
        assert closed_on and closed_on[0].startswith("vrex-model")  # not the event loop's thread
        return [d async for d in s.ask("and then?", max_new_tokens=2)]

    asyncio.run(go())
    assert [a.finish_reason for a in s.answers][0] == "cancelled"
    assert s.stats()["answers"] == 2


def test_a_failing_close_keeps_the_original_error_and_is_retried(tiny_smolvlm_dir, monkeypatch):
    engine = Engine(EngineConfig(model_dir=str(tiny_smolvlm_dir)))
    settings = SessionSettings(policy="resv", fps=1, max_new_tokens=32, temperature=1.0)
    from vrex.engine import session as session_mod

    real_sample, real_turn = session_mod._sample, engine.adapter.next_turn_input
    calls = {"sample": 0, "turn": 0}

    def failing_sample(*args):
        calls["sample"] += 1
        if calls["sample"] == 3:
            raise RuntimeError("decode broke")
        return real_sample(*args)

    def failing_turn():
        calls["turn"] += 1
        if calls["turn"] == 1:
            raise RuntimeError("close broke too")
        return real_turn()

    cut = engine.open_session(settings)
    cut.add_frame(_frames(1, seed=4)[0], 0.0)
    monkeypatch.setattr(session_mod, "_sample", failing_sample)
    monkeypatch.setattr(engine.adapter, "next_turn_input", failing_turn)
    with pytest.raises(RuntimeError, match="decode broke"):  # not the close's error
        list(cut.generate("what?"))
    monkeypatch.setattr(session_mod, "_sample", real_sample)
    assert cut.stats()["answers"] == 1 and cut._turn_open  # counted; the turn waits to be closed
    whole = engine.open_session(settings)
    whole.add_frame(_frames(1, seed=4)[0], 0.0)
    list(whole.generate("what?", max_new_tokens=3))
    cut._close_turn()  # what the next frame or question does first
    assert not cut._turn_open
    _assert_same_next_step(engine, cut, whole)


def test_a_snapshot_during_a_cut_off_answer_holds_a_closed_turn(tiny_smolvlm_dir, tmp_path):
    """A server stopping mid-answer snapshots before the stream's own clean-up runs."""
    engine = Engine(EngineConfig(model_dir=str(tiny_smolvlm_dir)))
    s = engine.open_session(SessionSettings(policy="resv", fps=1, max_new_tokens=32, temperature=1.0))

    async def go():
        assert (await s.submit_frame(_frames(1)[0], 0.0)).accepted
        stream = s.ask("what?")
        await stream.__anext__()
        await engine.run(s.snapshot, tmp_path / "snap")  # the release, before the stream closes
        await stream.aclose()

    asyncio.run(go())
    restored = type(s).restore(engine, tmp_path / "snap")
    assert restored.counters["answers"] == 1 and not restored._turn_open
    assert restored.history_tokens == s.history_tokens


def test_sampling_settings_are_checked_and_tiny_temperatures_sample(tiny_smolvlm_dir):
    engine = Engine(EngineConfig(model_dir=str(tiny_smolvlm_dir)))
    s = engine.open_session(SessionSettings(fps=1, max_new_tokens=3))
    before = s.history_tokens
    for bad in ({"temperature": 6.0}, {"temperature": float("nan")}, {"top_p": 0.0}):
        with pytest.raises(ValueError, match="temperature|top_p"):
            list(s.generate("what?", **bad))
    assert s.history_tokens == before and s.stats()["answers"] == 0  # nothing was prefilled
    with pytest.raises(ValueError, match=r"temperature must be in \[0, 5\]"):
        SessionSettings(temperature=10)
    # a temperature this small divided logits into inf - inf = nan before; now it is greedy
    list(s.generate("what?", temperature=0.0))
    s2 = engine.open_session(SessionSettings(fps=1, max_new_tokens=3))
    list(s2.generate("what?", temperature=1e-40))
    assert s2.answers[-1].history_token_ids == s.answers[-1].history_token_ids


def test_bad_input_errors(tiny_smolvlm_dir, tmp_path):
    with pytest.raises(ValueError, match="policy"):
        SessionSettings(policy="nope")
    with pytest.raises(ValueError, match="fps"):
        SessionSettings(fps=0)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError):
        Engine(EngineConfig(model_dir=str(tmp_path)))
    engine = Engine(EngineConfig(model_dir=str(tiny_smolvlm_dir), max_question_tokens=5, max_sessions=1))
    s = engine.open_session()
    with pytest.raises(ValueError, match="limit"):
        list(s.generate("a very long question " * 10))
    from vrex.engine import CapacityError

    with pytest.raises(CapacityError):
        engine.open_session()
    with pytest.raises(ValueError):
        Engine(EngineConfig(model_dir=str(tiny_smolvlm_dir), device_kv_budget_bytes=10)).open_session()


def _sample(name):
    from vrex.video import sample_video

    try:
        return sample_video(name)
    except FileNotFoundError as exc:
        pytest.skip(f"sample video missing: {exc}")


def test_demo_model_on_a_real_video_answers():
    from vrex.models.demo import ensure_demo_model
    from vrex.video import FileSource

    engine = Engine(EngineConfig(model_dir=str(ensure_demo_model())))
    assert engine.model_info["is_demo"] and "CANNOT REALLY SEE" in engine.model_info["notice"]
    s = engine.open_session(SessionSettings(policy="resv", fps=1, max_new_tokens=12))
    for ts, image in FileSource(_sample("bikes.mp4")):
        if ts > 3.0:
            break
        s.add_frame(image, ts)
    assert s.stats()["frames_accepted"] >= 3
    text = "".join(d.text for d in s.generate("What do you see?"))
    assert text.strip()
    # real weights through the retrieval path still answer text questions
    plain = engine.open_session(SessionSettings(policy="resv", max_new_tokens=12))
    text = "".join(d.text for d in plain.generate("What is the capital of France?"))
    assert "paris" in text.lower()


def test_vrex_run_cli_json(tiny_smolvlm_dir, tmp_path, capsys):
    from vrex.cli import main

    trace = tmp_path / "run.jsonl"
    rc = main(
        [
            "run",
            "--video",
            str(_sample("bikes.mp4")),
            "--model",
            str(tiny_smolvlm_dir),
            "--fps",
            "1",
            "--ask",
            "what?",
            "--ask-at",
            "2",
            "--ask",
            "and?",
            "--ask-at",
            "4",
            "--max-new-tokens",
            "3",
            "--max-seconds",
            "5",
            "--device-kv-budget",
            "1MiB",
            "--trace",
            str(trace),
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [a["asked_at_s"] for a in out["answers"]] == [2.0, 4.0]
    assert out["stats"]["frames_accepted"] >= 5
    header, steps = read_trace(trace)
    assert sum(1 for r in steps if r["stage"] == "frame") == out["stats"]["frames_accepted"]
    assert main(["run", "--video", str(tmp_path / "missing.mp4"), "--ask", "x"]) == 2
    assert out["model"]["dtype"] == "float32"  # --dtype auto on CPU


def test_vrex_run_dtype_flag(tiny_smolvlm_dir, capsys):
    assert _run_json(tiny_smolvlm_dir, capsys, "--dtype", "bf16")["model"]["dtype"] == "bfloat16"


def test_vrex_run_progress_is_one_line_per_frame_off_a_terminal(tiny_smolvlm_dir, capsys):
    from vrex.cli import main

    args = ["run", "--video", str(_sample("bikes.mp4")), "--model", str(tiny_smolvlm_dir), "--fps", "1"]
    assert main([*args, "--ask", "what?", "--max-new-tokens", "2", "--max-seconds", "3"]) == 0
    err = capsys.readouterr().err
    # captured stderr is not a terminal: one line per frame, no in-place rewrites in logs
    progress = [line for line in err.split("\n") if "kept /" in line]
    assert len(progress) >= 3
    assert all(line.count("kept /") == 1 and "\r" not in line for line in progress)


def _run_json(tiny_smolvlm_dir, capsys, *extra):
    from vrex.cli import main

    args = ["run", "--video", str(_sample("bikes.mp4")), "--model", str(tiny_smolvlm_dir), "--fps", "1"]
    args += ["--ask", "what?", "--max-new-tokens", "2", "--max-seconds", "3", "--json", *extra]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_vrex_run_reports_measured_energy(tiny_smolvlm_dir, capsys, monkeypatch):
    import sys
    from pathlib import Path

    import vrex.power as power

    # off a Jetson: no sampler, a note, and no numbers
    monkeypatch.setattr(power, "detect_sampler", lambda interval_ms=100: None)
    stats = _run_json(tiny_smolvlm_dir, capsys)["stats"]
    assert stats["power_sampler"] is None and stats["power_note"] == power.NO_SAMPLER_NOTE
    assert "energy_per_frame_mj" not in stats
    # a recorded Orin Nano tegrastats line (VDD_IN 7432 mW) every 20 ms
    line = (Path(__file__).parents[1] / "jetson" / "fixtures" / "tegrastats_orin_nano_jp6.log").read_text()
    line = line.splitlines()[0]
    script = f"import time\nwhile True:\n    print({line!r}, flush=True)\n    time.sleep(0.02)\n"
    monkeypatch.setattr(
        power,
        "detect_sampler",
        lambda interval_ms=100: power.PowerSampler("tegrastats", 20, command=[sys.executable, "-c", script]),
    )
    stats = _run_json(tiny_smolvlm_dir, capsys)["stats"]
    assert stats["power_sampler"] == "tegrastats"
    assert stats["energy_answers_measured"] == 1 and stats["energy_frames_measured"] >= 1
    assert stats["average_power_mw"] == pytest.approx(7432.0, rel=1e-6)
    assert stats["energy_per_frame_mj"] > 0


def test_engine_trace_replays_in_the_simulator(tiny_smolvlm_dir, tmp_path, capsys):
    """The two halves meet in the trace: what a session recorded, the simulator replays."""
    from vrex.cli import main

    trace = tmp_path / "t.jsonl"
    engine = Engine(EngineConfig(model_dir=str(tiny_smolvlm_dir)))
    s = engine.open_session(SessionSettings(policy="resv", fps=1, max_new_tokens=3), trace_path=str(trace))
    for i, f in enumerate(_frames(4)):
        s.add_frame(f, float(i))
    list(s.generate("what?"))
    s.close()
    assert main(["sim", "run", "--system", "vrex8", "--trace", str(trace), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frame_latency_ms"] > 0
    # the simulated vision tower is the streamed model's, from the header's HF config
    vision = engine.adapter.model.config.vision_config
    assert report["model"]["vision_layers"] == vision.num_hidden_layers
    assert report["model"]["vision_hidden_size"] == vision.hidden_size


def test_trace_dir_records_every_session_and_each_restore(tiny_smolvlm_dir, tmp_path):
    """`EngineConfig.trace_dir` (`vrex serve --trace-dir`): one replayable trace per session,
    readable while the session is open, and a fresh file when a snapshot is restored."""
    from vrex.cli import main

    traces = tmp_path / "traces"
    cfg = EngineConfig(
        model_dir=str(tiny_smolvlm_dir), data_dir=str(tmp_path / "data"), trace_dir=str(traces)
    )
    engine = Engine(cfg)
    s = engine.open_session(SessionSettings(policy="resv", fps=1))
    for i, f in enumerate(_frames(3)):
        s.add_frame(f, float(i))
    first = traces / f"{s.id}.jsonl"
    header, steps = read_trace(first)  # before close: flushed per step
    steps = list(steps)
    assert [st["stage"] for st in steps].count("frame") == 3
    s.snapshot()
    engine.close_session(s.id)
    restored = engine.resume(s.id)
    restored.add_frame(_frames(4)[3], 3.0)
    engine.close_session(restored.id)
    assert len(list(read_trace(first)[1])) == len(steps)  # the first trace is left as it was
    header2, steps2 = read_trace(traces / f"{s.id}.1.jsonl")
    assert header2["model"] == header["model"] and [st["stage"] for st in steps2] == ["frame"]
    assert main(["sim", "run", "--trace", str(first), "--json"]) == 0
