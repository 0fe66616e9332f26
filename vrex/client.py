"""Python client for the V-Rex gRPC API (`vrex stream` is built on it).

    async with Client("127.0.0.1:50051", api_key="...") as client:
        print(await client.server_info())
        async with client.session(fps=2.0) as session:
            await session.send_frame(rgb_array, timestamp_s=0.0)     # returns at once
            ack = await session.send_frame(rgb_array, timestamp_s=0.5, wait=True)
            async for text in session.ask("What is happening?"):    # token deltas
                print(text, end="")
            print(session.last_answer.stats)

Per-request errors (bad frame, question too long, ...) raise `VRexError` from the call that
waits for them; errors of frames sent without `wait` go to `on_error` (or are counted).
A frame too large to send raises `FrameTooLargeError` before it is sent: a message over the
transport limit would end the whole call. The server's own limits are checked too once
`server_info()` has been called on the client.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from vrex.api import vrex_pb2 as pb
from vrex.api import vrex_pb2_grpc as pb_grpc

API_KEY_HEADER = "x-api-key"
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


class VRexError(Exception):
    """An error the server reported for one request (the stream, if any, goes on)."""

    def __init__(self, code: grpc.StatusCode | str, message: str, request_id: int = 0):
        self.code = code.name if isinstance(code, grpc.StatusCode) else str(code)
        self.message = message
        self.request_id = request_id
        super().__init__(f"{self.code}: {message}")


class FrameTooLargeError(ValueError):
    """A frame over the server's (or this client's transport) size limits; nothing was sent."""


@dataclass
class FrameAck:
    request_id: int
    accepted: bool
    dropped_reason: str
    frame_index: int
    timestamp_s: float
    history_tokens: int
    fetched_fraction: float
    latency_ms: float
    ack_latency_ms: float
    frames_accepted: int
    frames_dropped: int
    round_trip_ms: float = 0.0  # client send -> ack received


@dataclass
class Answer:
    text: str
    num_tokens: int
    finish_reason: str
    time_to_first_token_ms: float
    total_ms: float
    fetched_fraction_text: float
    stats: dict[str, float] = field(default_factory=dict)


def encode_image(image: np.ndarray, fmt: str = "jpeg", quality: int = 85) -> bytes:
    """Encode an HxWx3 uint8 array as JPEG/PNG/WebP bytes."""
    from PIL import Image

    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt.lower() in ("jpeg", "webp") else {}
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format=fmt.upper(), **kwargs)
    return buf.getvalue()


def frame_message(image: np.ndarray | bytes, timestamp_s: float, encoding: str = "jpeg") -> pb.Frame:
    """A `vrex.v1.Frame` from encoded bytes, or from an RGB array (encoded or raw)."""
    if isinstance(image, (bytes, bytearray)):
        return pb.Frame(encoded=bytes(image), timestamp_s=timestamp_s)
    array = np.ascontiguousarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got shape {array.shape}")
    if encoding == "raw":
        h, w = array.shape[:2]
        return pb.Frame(raw=pb.RawImage(rgb=array.tobytes(), width=w, height=h), timestamp_s=timestamp_s)
    return pb.Frame(encoded=encode_image(array, encoding), timestamp_s=timestamp_s)


def check_frame_size(event: pb.ClientEvent, limits: pb.Limits | None = None) -> None:
    """Raise FrameTooLargeError for a frame event over the server's limits (when known) or the
    transport limit of this client's channel: an oversized message ends the whole call."""
    frame = event.frame
    payload_bytes = len(frame.raw.rgb if frame.WhichOneof("image") == "raw" else frame.encoded)
    if limits is not None and limits.max_frame_bytes and payload_bytes > limits.max_frame_bytes:
        raise FrameTooLargeError(
            f"frame is {payload_bytes} bytes, over the server's max_frame_bytes of {limits.max_frame_bytes}; "
            "send a smaller image or encode it as JPEG"
        )
    message_limit_bytes = MAX_MESSAGE_BYTES
    if limits is not None and limits.max_message_bytes:
        message_limit_bytes = min(message_limit_bytes, limits.max_message_bytes)
    message_bytes = event.ByteSize() + 16  # + the request id set when it is sent
    if message_bytes > message_limit_bytes:
        raise FrameTooLargeError(
            f"frame message is {message_bytes} bytes, over the message limit of {message_limit_bytes}; "
            "send a smaller image or encode it as JPEG"
        )


def make_channel(
    target: str,
    tls_ca: str | Path | None = None,
    tls: bool = False,
    server_name: str | None = None,
) -> grpc.aio.Channel:
    """An aio channel; TLS when `tls_ca` is given (or `tls` for system roots)."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if tls_ca is not None or tls:
        root = Path(tls_ca).read_bytes() if tls_ca is not None else None
        return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root), options=options)
    return grpc.aio.insecure_channel(target, options=options)


class Client:
    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        tls_ca: str | Path | None = None,
        channel: grpc.aio.Channel | None = None,
    ):
        self.target = target
        self.channel = channel or make_channel(target, tls_ca)
        self.stub = pb_grpc.VRexStub(self.channel)
        self.metadata: tuple[tuple[str, str], ...] = ((API_KEY_HEADER, api_key),) if api_key else ()
        # the last GetServerInfo reply: its limits let sessions refuse oversized frames locally
        self.info: pb.ServerInfo | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), timeout_s)

    async def server_info(self, timeout_s: float = 10.0) -> pb.ServerInfo:
        self.info = await self._unary(self.stub.GetServerInfo, pb.ServerInfoRequest(), timeout_s)
        return self.info

    async def session_stats(self, session_id: str, timeout_s: float = 10.0) -> pb.SessionStats:
        return await self._unary(
            self.stub.GetSessionStats, pb.SessionStatsRequest(session_id=session_id), timeout_s
        )

    async def resume_session(self, session_id: str, timeout_s: float = 30.0) -> pb.SessionInfo:
        return await self._unary(
            self.stub.ResumeSession, pb.ResumeSessionRequest(session_id=session_id), timeout_s
        )

    async def health(self, service: str = "", timeout_s: float = 5.0) -> str:
        """The grpc.health.v1 status name ("SERVING", "NOT_SERVING", ...)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def _unary(self, method, request, timeout_s: float):
        try:
            return await method(request, timeout=timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise VRexError(exc.code(), exc.details() or "") from exc

    def session(
        self,
        *,
        fps: float = 0.0,
        policy: str = "",
        max_new_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: tuple[str, ...] = (),
        resume_session_id: str = "",
        on_ack: Callable[[FrameAck], None] | None = None,
        on_error: Callable[[VRexError], None] | None = None,
        timeout_s: float | None = None,
    ) -> StreamSession:
        """A session over one bidirectional stream; use as `async with`."""
        settings = pb.SessionSettings(fps=fps, policy=policy, max_new_tokens=max_new_tokens, stop=list(stop))
        if temperature is not None:
            settings.temperature = temperature
        if top_p is not None:
            settings.top_p = top_p
        open_msg = pb.Open(settings=settings, resume_session_id=resume_session_id)
        return StreamSession(self, open_msg, on_ack=on_ack, on_error=on_error, timeout_s=timeout_s)


class StreamSession:
    """One open session. Frames are fire-and-forget unless `wait=True`; acks update counters."""

    def __init__(self, client: Client, open_msg: pb.Open, *, on_ack=None, on_error=None, timeout_s=None):
        self._client = client
        self._open_msg = open_msg
        self._on_ack = on_ack
        self._on_error = on_error
        self._timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future] = {}
        self._answers: dict[int, asyncio.Queue] = {}
        self._call = None
        self._receiver: asyncio.Task | None = None
        self._closed = asyncio.Event()
        self._closing = False  # this client asked to close (close())
        self._write_lock = asyncio.Lock()
        self._frame_sent_s: dict[int, float] = {}  # request id -> send time, until acked
        self.session_id = ""
        self.opened: pb.SessionOpened | None = None
        self.closed_event: pb.SessionClosed | None = None
        self.last_ack: FrameAck | None = None
        self.last_answer: Answer | None = None
        self.frames_sent = 0
        self.frames_accepted = 0
        self.frames_dropped = 0
        self.errors: list[VRexError] = []
        self.end_status: grpc.StatusCode | None = None

    async def __aenter__(self) -> StreamSession:
        await self.start()
        return self

    async def __aexit__(self, exc_type, *exc: Any) -> None:
        if exc_type is None:
            await self.close()
        else:
            self.cancel()

    async def start(self) -> pb.SessionOpened:
        self._call = self._client.stub.Stream(metadata=self._client.metadata, timeout=self._timeout_s)
        # The server sends initial metadata at once; a refused call (UNAUTHENTICATED, ...) ends
        # instead. Waiting for either keeps the first write from racing the refusal, which
        # grpc reports as a vague INTERNAL error.
        await self._call.initial_metadata()
        if self._call.done():
            code = await self._call.code()
            raise VRexError(code, await self._call.details() or code.name)
        self._receiver = asyncio.create_task(self._receive())
        opened = await self._request(pb.ClientEvent(open=self._open_msg), wait=True)
        self.opened = opened
        self.session_id = opened.session_id
        return opened

    async def send_frame(
        self, image: np.ndarray | bytes, timestamp_s: float, *, wait: bool = False, encoding: str = "jpeg"
    ) -> FrameAck | int:
        """Send one frame. Returns its request id, or with `wait` its FrameAck.

        Raises FrameTooLargeError, sending nothing, for a frame over the size limits."""
        limits = self._client.info.limits if self._client.info is not None else None
        if (
            isinstance(image, np.ndarray)
            and image.ndim == 3
            and limits is not None
            and limits.max_frame_pixels
        ):
            h, w = image.shape[:2]
            if w * h > limits.max_frame_pixels:  # before encoding: that can take seconds
                raise FrameTooLargeError(
                    f"frame is {w}x{h} = {w * h} pixels, over the server's max_frame_pixels of "
                    f"{limits.max_frame_pixels}; downscale it before sending"
                )
        event = pb.ClientEvent(frame=frame_message(image, timestamp_s, encoding))
        check_frame_size(event, limits)
        self.frames_sent += 1
        return await self._request(event, wait=wait)

    async def send_raw_event(self, event: pb.ClientEvent, wait: bool = False):
        """Send any client event (its request_id is assigned here)."""
        return await self._request(event, wait=wait)

    async def ask(
        self,
        text: str,
        *,
        max_new_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: tuple[str, ...] = (),
    ) -> AsyncIterator[str]:
        """Ask a question; yields the answer's text deltas. `last_answer` has the stats after."""
        if not 0 <= max_new_tokens < 2**32:
            raise ValueError(f"max_new_tokens must be >= 0 (0 = the session's default), got {max_new_tokens}")
        q = pb.Question(text=text, max_new_tokens=max_new_tokens, stop=list(stop))
        if temperature is not None:
            q.temperature = temperature
        if top_p is not None:
            q.top_p = top_p
        rid = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        self._answers[rid] = queue
        try:
            await self._write(pb.ClientEvent(request_id=rid, question=q))
            while True:
                kind, value = await queue.get()
                if kind == "delta":
                    yield value
                elif kind == "done":
                    self.last_answer = value
                    return
                else:
                    raise value
        finally:
            self._answers.pop(rid, None)

    async def ask_text(self, text: str, **kwargs: Any) -> Answer:
        """Ask and wait for the whole answer."""
        async for _ in self.ask(text, **kwargs):
            pass
        assert self.last_answer is not None
        return self.last_answer

    async def stats(self) -> pb.SessionStats:
        return await self._client.session_stats(self.session_id)

    async def close(self, timeout_s: float = 60.0) -> pb.SessionClosed | None:
        """Send Close, wait until the server has closed the session, end the call."""
        if self._call is None:
            return None
        if not self._closed.is_set():
            try:
                self._closing = True
                await self._write(pb.ClientEvent(request_id=next(self._ids), close=pb.Close()))
                async with self._write_lock:
                    await self._call.done_writing()
            except (VRexError, grpc.aio.AioRpcError, asyncio.InvalidStateError, RuntimeError):
                pass
            try:
                await asyncio.wait_for(self._closed.wait(), timeout_s)
            except asyncio.TimeoutError:
                self.cancel()
        if self._receiver is not None:
            await asyncio.gather(self._receiver, return_exceptions=True)
        return self.closed_event

    async def done_writing(self) -> None:
        """Half-close: the server processes what is queued, closes the session, ends the call."""
        async with self._write_lock:
            await self._call.done_writing()

    async def wait_closed(self, timeout_s: float = 60.0) -> None:
        await asyncio.wait_for(self._closed.wait(), timeout_s)

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    # ------------------------------------------------------------------ plumbing

    def _ended_advice(self) -> str:
        if self.session_id:
            return (
                f"resume session {self.session_id} (resume_session_id=..., or vrex stream --resume) "
                "if the server keeps snapshots (--data-dir); otherwise open a new session"
            )
        return "open a new session"

    async def _write(self, event: pb.ClientEvent) -> None:
        if self._closed.is_set():
            if self._closing:
                how = "this session was closed (close())"
            elif self.end_status in (None, grpc.StatusCode.OK):
                how = "the server ended the stream (it may be shutting down)"
            else:
                how = f"the stream ended with {self.end_status.name}"
            raise VRexError("UNAVAILABLE", f"{how}; {self._ended_advice()}")
        try:
            async with self._write_lock:  # grpc.aio allows one write in flight per call
                await self._call.write(event)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            # a write that races the call's end can fail with a vague error: report the
            # call's own final status instead
            code = await self._call.code()
            details = await self._call.details()
            raise VRexError(
                code, details or f"stream has ended ({code.name}); {self._ended_advice()}"
            ) from exc

    async def _request(self, event: pb.ClientEvent, wait: bool):
        rid = next(self._ids)
        event.request_id = rid
        future = None
        if wait:
            future = asyncio.get_running_loop().create_future()
            self._waiters[rid] = future
        if event.HasField("frame"):
            self._frame_sent_s[rid] = time.monotonic()
        try:
            await self._write(event)
        except BaseException:
            self._waiters.pop(rid, None)
            self._frame_sent_s.pop(rid, None)
            raise
        if future is None:
            return rid
        return await future

    async def _receive(self) -> None:
        try:
            async for event in self._call:
                self._dispatch(event)
            self.end_status = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            self.end_status = exc.code()
            self._fail_all(VRexError(exc.code(), exc.details() or "stream ended"))
        except asyncio.CancelledError:
            self.end_status = grpc.StatusCode.CANCELLED
            self._fail_all(VRexError("CANCELLED", "stream cancelled"))
        finally:
            self._fail_all(VRexError("UNAVAILABLE", "stream ended before this request was answered"))
            self._closed.set()

    def _fail_all(self, error: VRexError) -> None:
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(error)
        self._waiters.clear()
        for queue in self._answers.values():
            queue.put_nowait(("error", error))

    def _resolve(self, rid: int, value: Any = None, error: VRexError | None = None) -> bool:
        future = self._waiters.pop(rid, None)
        if future is None or future.done():
            return False
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
        return True

    def _dispatch(self, event: pb.ServerEvent) -> None:
        rid = event.request_id
        kind = event.WhichOneof("event")
        if kind == "opened":
            self._resolve(rid, event.opened)
        elif kind == "frame_ack":
            a = event.frame_ack
            ack = FrameAck(
                request_id=rid,
                accepted=a.accepted,
                dropped_reason=a.dropped_reason,
                frame_index=a.frame_index,
                timestamp_s=a.timestamp_s,
                history_tokens=a.history_tokens,
                fetched_fraction=a.fetched_fraction,
                latency_ms=a.latency_ms,
                ack_latency_ms=a.ack_latency_ms,
                frames_accepted=a.frames_accepted,
                frames_dropped=a.frames_dropped,
            )
            sent_s = self._frame_sent_s.pop(rid, None)
            if sent_s is not None:
                ack.round_trip_ms = (time.monotonic() - sent_s) * 1000
            self.last_ack = ack
            self.frames_accepted = ack.frames_accepted
            self.frames_dropped = ack.frames_dropped
            if self._on_ack is not None:
                self._on_ack(ack)
            self._resolve(rid, ack)
        elif kind == "answer_delta":
            queue = self._answers.get(rid)
            if queue is not None:
                queue.put_nowait(("delta", event.answer_delta.text))
        elif kind == "answer_done":
            d = event.answer_done
            answer = Answer(
                text=d.text,
                num_tokens=d.num_tokens,
                finish_reason=d.finish_reason,
                time_to_first_token_ms=d.time_to_first_token_ms,
                total_ms=d.total_ms,
                fetched_fraction_text=d.fetched_fraction_text,
                stats=dict(d.stats),
            )
            queue = self._answers.get(rid)
            if queue is not None:
                queue.put_nowait(("done", answer))
        elif kind == "error":
            error = VRexError(event.error.code_name or str(event.error.code), event.error.message, rid)
            self._frame_sent_s.pop(rid, None)
            self.errors.append(error)
            queue = self._answers.get(rid)
            if queue is not None:
                queue.put_nowait(("error", error))
            elif not self._resolve(rid, error=error) and self._on_error is not None:
                self._on_error(error)
        elif kind == "closed":
            self.closed_event = event.closed
