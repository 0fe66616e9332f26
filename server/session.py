"""One bidirectional `Stream` call: the session it carries, its bounded queues and its worker.

Three coroutines per call, joined by bounded queues only:

    reader  -- reads client events, validates cheap things, queues frames/questions
    worker  -- decodes frames, feeds the engine, answers questions, snapshots
    (the servicer's generator) -- yields the outbound queue to gRPC

Backpressure: at most `max_pending_frames` frames wait for the engine; when another arrives
the oldest waiting frame is dropped ("backpressure") and acked as such, so a session that
falls behind real time keeps only recent frames. Questions are never dropped, but at most
`max_pending_questions` may wait. The outbound queue is bounded too: a client that stops
reading stalls its own worker (and then its frames are dropped), never the server.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from server.backend import answer_stats, normalize_stats
from server.energy import SessionEnergy
from server.images import FrameError, check_frame_size, decode_frame
from server.logs import log_event
from server.wal import WriteAheadLog
from vrex.api import vrex_pb2 as pb
from vrex.limits import sampling_error

if TYPE_CHECKING:
    from server.service import VRexServicer

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
DEFAULT_FPS = 2.0
DEFAULT_POLICY = "resv"
DEFAULT_MAX_NEW_TOKENS = 64
# Who dropped a frame. The engine's drops (its reason text varies) are in its frames_dropped;
# the server's own are counted in LiveSession.frames_dropped_backpressure.
DROP_ENGINE = "engine"  # over the fps, timestamps going back, behind real time
DROP_BACKPRESSURE = "backpressure"
DROP_SHUTDOWN = "shutdown"


class RequestError(Exception):
    """A bad request: answered with an Error event; the stream goes on."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def error_event(request_id: int, code: grpc.StatusCode, message: str) -> pb.ServerEvent:
    return pb.ServerEvent(
        request_id=request_id, error=pb.Error(code=code.value[0], code_name=code.name, message=message)
    )


@dataclass
class LiveSession:
    """A session held by this server: an engine session plus the server's own bookkeeping."""

    engine_session: Any
    settings: pb.SessionSettings
    attached: bool = False
    frames_dropped_backpressure: int = 0  # the server's drops (backpressure, shutdown), not the engine's
    last_used_s: float = field(default_factory=time.monotonic)
    last_snapshot_s: float = 0.0
    dirty: bool = False  # acked frames not yet in a snapshot
    wal: WriteAheadLog | None = None  # --durability wal: acked records since the last snapshot
    # the log failed to take a record the session already holds: the next ack needs a snapshot
    snapshot_before_ack: bool = False
    energy: SessionEnergy = field(default_factory=lambda: SessionEnergy(None))

    @property
    def id(self) -> str:
        return self.engine_session.id

    def stats(self) -> dict:
        stats = normalize_stats(self.engine_session.stats())
        stats.update(self.energy.stats())
        if self.wal is not None:
            stats["wal_records"] = self.wal.num_records
            stats["wal_bytes"] = self.wal.num_bytes
        return stats


def check_session_id(session_id: str) -> None:
    if not SESSION_ID_RE.match(session_id):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"session id {session_id[:40]!r} is malformed; use the id the server returned in `opened`",
        )


def effective_settings(
    requested: pb.SessionSettings, max_new_tokens_limit: int, max_fps: float
) -> pb.SessionSettings:
    """Fill defaults into the client's settings and check ranges."""
    fps = requested.fps or DEFAULT_FPS
    if not (math.isfinite(fps) and 0 < fps <= max_fps):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"settings.fps must be in (0, {max_fps}], got {fps}"
        )
    out = pb.SessionSettings(
        fps=fps,
        policy=requested.policy or DEFAULT_POLICY,
        max_new_tokens=requested.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, max_new_tokens_limit),
        temperature=requested.temperature if requested.HasField("temperature") else 0.0,
        top_p=requested.top_p if requested.HasField("top_p") else 1.0,
        stop=list(requested.stop),
    )
    _check_sampling(
        "settings", out.max_new_tokens, out.temperature, out.top_p, out.stop, max_new_tokens_limit
    )
    return out


def _check_sampling(
    where: str, max_new_tokens: int, temperature: float, top_p: float, stop, limit: int
) -> None:
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if max_new_tokens > limit:
        raise RequestError(
            bad, f"{where}.max_new_tokens is {max_new_tokens}, over the server limit of {limit}"
        )
    problem = sampling_error(temperature, top_p)
    if problem:
        raise RequestError(bad, f"{where}.{problem}")
    if len(stop) > 16 or any(len(s) == 0 or len(s) > 64 for s in stop):
        raise RequestError(bad, f"{where}.stop takes at most 16 non-empty strings of at most 64 characters")


@dataclass
class _FrameItem:
    request_id: int
    frame: pb.Frame
    received_s: float


@dataclass
class _QuestionItem:
    request_id: int
    question: pb.Question


@dataclass
class _CloseItem:
    request_id: int


class MalformedEvent:
    """Stands in for a client message that did not parse (a ClientEvent, or a unary request)."""

    def __init__(self, data: bytes, reason: str, type_name: str = "ClientEvent"):
        self.num_bytes = len(data)
        self.reason = reason
        self.type_name = type_name
        # field 1 (request_id, a varint) is written first: the error can still answer it
        self.request_id = _leading_varint_field1(data)

    def message(self) -> str:
        what = f"a {self.num_bytes}-byte message is not a valid vrex.v1.{self.type_name}"
        if "utf-8" in self.reason.lower():
            return f"{what}: a text field is not valid UTF-8; encode strings as UTF-8"
        return (
            f"{what} ({self.reason[:200]}); check that the client uses the vrex/v1/vrex.proto of this server"
        )


def _leading_varint_field1(data: bytes) -> int:
    """The value of field 1 if the message starts with it as a varint, else 0."""
    if not data or data[0] != 0x08:
        return 0
    value = 0
    for i, byte in enumerate(data[1:11]):
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value if value < 2**64 else 0  # a uint64, or not a request id
    return 0


_END = object()  # outbound sentinel: the call is over


class StreamHandler:
    def __init__(self, servicer: VRexServicer, context: grpc.aio.ServicerContext):
        self.servicer = servicer
        self.config = servicer.config
        self.context = context
        self.live: LiveSession | None = None
        self.outbound: asyncio.Queue = asyncio.Queue(maxsize=self.config.max_outbound_events)
        self.work: collections.deque = collections.deque()
        self.num_pending_frames = 0
        self.num_pending_questions = 0
        self.wake = asyncio.Event()
        self.input_done = False  # the client half-closed, sent Close, or the reader failed
        self.shutting_down = False
        # frames must not go back in time: the newest timestamp queued, and the newest of the
        # frames that decoded (a frame that fails is forgotten, so it holds no later frame back)
        self.last_timestamp_s: float | None = None
        self.decoded_timestamp_s: float | None = None
        self.peer = context.peer() if hasattr(context, "peer") else "?"

    # ------------------------------------------------------------------ lifecycle

    async def run(self, request_iterator):
        """Yield server events until the call is over; always frees the session."""
        reader = asyncio.create_task(self._read(request_iterator))
        worker = asyncio.create_task(self._work())
        self.servicer.handlers.add(self)
        try:
            while True:
                event = await self.outbound.get()
                if event is _END:
                    break
                yield event
        finally:
            self.servicer.handlers.discard(self)
            for task in (reader, worker):
                task.cancel()
            await asyncio.gather(reader, worker, return_exceptions=True)
            await self._detach()

    def begin_shutdown(self) -> None:
        """Server is stopping: take no new events, finish the answer in flight, then end."""
        self.shutting_down = True
        self.wake.set()

    async def _emit(self, event: pb.ServerEvent) -> None:
        await self.outbound.put(event)

    async def _detach(self) -> None:
        live, self.live = self.live, None
        if live is None:
            return
        try:
            await self.servicer.release(live)
        except Exception:
            logging.getLogger("vrex.server").exception("failed to release session %s", live.id)

    # ------------------------------------------------------------------ reader

    async def _read(self, request_iterator) -> None:
        try:
            async for event in request_iterator:
                if self.shutting_down:
                    await self._emit(
                        error_event(
                            event.request_id,
                            grpc.StatusCode.UNAVAILABLE,
                            "server is shutting down; reconnect later and resume the session by id",
                        )
                    )
                    continue
                try:
                    if await self._on_event(event):
                        break
                except RequestError as exc:
                    await self._emit(error_event(event.request_id, exc.code, exc.message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken request stream ends input, not the server
            log_event("stream_read_error", logging.WARNING, peer=self.peer, error=repr(exc))
        finally:
            self.input_done = True
            self.wake.set()

    async def _on_event(self, event: pb.ClientEvent | MalformedEvent) -> bool:
        """Handle one client event; True when no further events are read."""
        if isinstance(event, MalformedEvent):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, event.message())
        kind = event.WhichOneof("event")
        rid = event.request_id
        if kind is None:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "client event is empty; set one of open, frame, question, close",
            )
        if kind == "open":
            await self._open(rid, event.open)
            return False
        if self.live is None:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION, f"`{kind}` before `open`; send `open` first"
            )
        self.live.last_used_s = time.monotonic()
        if kind == "frame":
            self._queue_frame(rid, event.frame)
            if self.num_pending_frames > self.config.max_pending_frames:
                await self._drop_oldest_frame()
        elif kind == "question":
            self._queue_question(rid, event.question)
        else:  # close
            self.work.append(_CloseItem(rid))
            self.wake.set()
            return True
        return False

    async def _open(self, rid: int, msg: pb.Open) -> None:
        if self.live is not None:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this stream already carries session {self.live.id}; open another stream for a second session",
            )
        if msg.resume_session_id:
            check_session_id(msg.resume_session_id)
            live, resumed = await self.servicer.attach(msg.resume_session_id)
        else:
            limits = self.config.limits
            settings = effective_settings(msg.settings, limits.max_new_tokens, limits.max_fps)
            live, resumed = await self.servicer.open_new(settings), False
        self.live = live
        stats = live.stats()
        info = self.servicer.backend.model_info
        last_ts = stats.get("last_frame_ts")
        # a resumed stream continues the session's clock (its frames are refused, with the
        # reason, if they start over)
        self.last_timestamp_s = self.decoded_timestamp_s = None if last_ts is None else float(last_ts)
        await self._emit(
            pb.ServerEvent(
                request_id=rid,
                opened=pb.SessionOpened(
                    session_id=live.id,
                    settings=live.settings,
                    resumed=resumed,
                    frames_accepted=int(stats.get("frames_accepted", 0)),
                    history_tokens=int(stats.get("history_tokens", 0)),
                    model_name=str(info.get("name", "")),
                    is_demo_model=bool(info.get("is_demo", False)),
                    last_frame_timestamp_s=self.last_timestamp_s,
                ),
            )
        )

    def _queue_frame(self, rid: int, frame: pb.Frame) -> None:
        try:
            check_frame_size(frame, self.config.limits)
        except FrameError as exc:
            self.servicer.metrics.frame_error()
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        ts = frame.timestamp_s
        if self.last_timestamp_s is not None and ts < self.last_timestamp_s:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"timestamp_s went back from {self.last_timestamp_s} to {ts}; timestamps must not "
                "decrease, also across a resume (continue after SessionOpened.last_frame_timestamp_s)",
            )
        self.last_timestamp_s = ts
        self.work.append(_FrameItem(rid, frame, time.monotonic()))
        self.num_pending_frames += 1
        self.wake.set()

    async def _drop_oldest_frame(self) -> None:
        for i, item in enumerate(self.work):
            if isinstance(item, _FrameItem):
                del self.work[i]
                self.num_pending_frames -= 1
                await self._ack_server_drop(item, DROP_BACKPRESSURE)
                return

    async def _ack_server_drop(self, item: _FrameItem, kind: str) -> None:
        """Ack a frame the server dropped before the engine saw it; the engine does not count it."""
        live = self.live
        assert live is not None
        live.frames_dropped_backpressure += 1
        # the engine numbers only the frames it takes: this one gets the number it would have had
        index = self.servicer.backend.next_frame_index(live.engine_session)
        await self._ack_dropped(item, kind, kind, index)

    async def _ack_engine_drop(self, item: _FrameItem, result: Any) -> None:
        """Ack a frame the engine dropped; the engine counted it already, whatever its reason says."""
        live = self.live
        assert live is not None
        index = int(result.frame_index)
        if index < 0:  # an engine that does not number its dropped frames
            index = self.servicer.backend.next_frame_index(live.engine_session)
        await self._ack_dropped(item, DROP_ENGINE, result.dropped_reason or DROP_ENGINE, index)

    async def _ack_dropped(self, item: _FrameItem, kind: str, reason: str, frame_index: int) -> None:
        live = self.live
        assert live is not None
        stats = live.stats()
        ack_ms = (time.monotonic() - item.received_s) * 1000
        self.servicer.metrics.frame(False, kind, ack_ms)  # the kind: a label with few values
        await self._emit(
            pb.ServerEvent(
                request_id=item.request_id,
                frame_ack=pb.FrameAck(
                    accepted=False,
                    dropped_reason=reason,
                    frame_index=frame_index,
                    timestamp_s=item.frame.timestamp_s,
                    history_tokens=int(stats.get("history_tokens", 0)),
                    ack_latency_ms=ack_ms,
                    frames_accepted=int(stats.get("frames_accepted", 0)),
                    frames_dropped=int(stats.get("frames_dropped", 0)) + live.frames_dropped_backpressure,
                ),
            )
        )

    def _queue_question(self, rid: int, q: pb.Question) -> None:
        limits = self.config.limits
        text = q.text.strip()
        if not text:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "question.text is empty; ask something")
        if len(q.text) > limits.max_question_chars:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"question is {len(q.text)} characters, over the limit of {limits.max_question_chars}; shorten it",
            )
        temperature = q.temperature if q.HasField("temperature") else 0.0
        top_p = q.top_p if q.HasField("top_p") else 1.0
        _check_sampling("question", q.max_new_tokens, temperature, top_p, q.stop, limits.max_new_tokens)
        if self.num_pending_questions >= self.config.max_pending_questions:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.num_pending_questions} questions are already waiting; wait for an answer before asking more",
            )
        self.work.append(_QuestionItem(rid, q))
        self.num_pending_questions += 1
        self.wake.set()

    # ------------------------------------------------------------------ worker

    async def _work(self) -> None:
        try:
            while True:
                if self.shutting_down:
                    await self._flush_for_shutdown()
                    break
                if self.work:
                    item = self.work.popleft()
                    if isinstance(item, _CloseItem):
                        await self._close(item.request_id)
                        return
                    try:
                        if isinstance(item, _FrameItem):
                            self.num_pending_frames -= 1
                            await self._process_frame(item)
                        else:
                            self.num_pending_questions -= 1
                            await self._answer(item)
                    except Exception as exc:  # a bug here must cost one request, not the session
                        logging.getLogger("vrex.server").exception("request %s failed", item.request_id)
                        await self._emit(
                            error_event(
                                item.request_id,
                                grpc.StatusCode.INTERNAL,
                                f"server error {type(exc).__name__}: {exc}; the session goes on, see the server log",
                            )
                        )
                    continue
                if self.input_done:
                    break
                self.wake.clear()
                await self._wait_for_work()
            if self.live is not None:
                await self._close(0)
        finally:
            await self.outbound.put(_END)

    async def _wait_for_work(self) -> None:
        live = self.live
        interval = self.config.snapshot_interval_s
        if live is not None and live.dirty and interval > 0:
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=interval)
            except asyncio.TimeoutError:
                await self.servicer.snapshot(live)
            return
        await self.wake.wait()

    async def _flush_for_shutdown(self) -> None:
        while self.work:
            item = self.work.popleft()
            if isinstance(item, _FrameItem):
                await self._ack_server_drop(item, DROP_SHUTDOWN)
            elif isinstance(item, _QuestionItem):
                await self._emit(
                    error_event(
                        item.request_id,
                        grpc.StatusCode.UNAVAILABLE,
                        "server is shutting down before this question's turn; ask again after resuming",
                    )
                )
        self.num_pending_frames = self.num_pending_questions = 0

    async def _close(self, rid: int) -> None:
        live, self.live = self.live, None
        if live is None:
            return
        resumable = await self.servicer.release(live)
        await self._emit(
            pb.ServerEvent(request_id=rid, closed=pb.SessionClosed(session_id=live.id, resumable=resumable))
        )

    def _forget_failed_timestamp(self) -> None:
        """The frame just failed: later frames need only not go back from the others."""
        queued = [i.frame.timestamp_s for i in self.work if isinstance(i, _FrameItem)]
        known = [t for t in (self.decoded_timestamp_s, *queued) if t is not None]
        self.last_timestamp_s = max(known, default=None)

    async def _make_answer_durable(self, request_id: int, live: LiveSession, question: str) -> None:
        try:
            await self.servicer.make_answer_durable(live, question)
        except RequestError as exc:
            await self._emit(error_event(request_id, exc.code, exc.message))
        except Exception as exc:
            log_event("wal_error", logging.ERROR, session=live.id, error=repr(exc))
            await self._emit(
                error_event(
                    request_id,
                    grpc.StatusCode.INTERNAL,
                    f"the answer could not be logged ({exc}); it may be lost if the server crashes",
                )
            )

    async def _process_frame(self, item: _FrameItem) -> None:
        live = self.live
        assert live is not None
        try:
            image = await asyncio.to_thread(decode_frame, item.frame, self.config.limits)
        except FrameError as exc:
            self.servicer.metrics.frame_error()
            self._forget_failed_timestamp()
            await self._emit(error_event(item.request_id, grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
            return
        before = self.decoded_timestamp_s
        self.decoded_timestamp_s = item.frame.timestamp_s
        try:
            t0_s = live.energy.clock()
            result = await live.engine_session.submit_frame(image, item.frame.timestamp_s)
            t1_s = live.energy.clock()
        except Exception as exc:
            code, message = self.servicer.backend.status_of(exc)
            log_event("frame_error", logging.WARNING, session=live.id, code=code.name, error=repr(exc))
            self.decoded_timestamp_s = before
            self._forget_failed_timestamp()
            await self._emit(error_event(item.request_id, code, message))
            return
        if not result.accepted:
            await self._ack_engine_drop(item, result)
            return
        # the engine's own time for the frame, not the wait for the shared model thread
        engine_s = float(getattr(result, "latency_ms", 0.0) or 0.0) / 1000
        live.energy.record("frame", max(t0_s, t1_s - engine_s) if engine_s > 0 else t0_s, t1_s)
        live.dirty = True
        # durable before the ack, so every acknowledged frame survives kill -9
        try:
            await self.servicer.make_frame_durable(live, item.frame, result)
        except RequestError as exc:  # the frame is in the session, not yet durable: no ack
            await self._emit(error_event(item.request_id, exc.code, exc.message))
            return
        self.servicer.charge_energy(live)
        stats = live.stats()
        self.servicer.metrics.kv_bytes(live.id, stats.get("kv_bytes", {}))
        ack_ms = (time.monotonic() - item.received_s) * 1000
        self.servicer.metrics.frame(True, "", ack_ms)
        await self._emit(
            pb.ServerEvent(
                request_id=item.request_id,
                frame_ack=pb.FrameAck(
                    accepted=True,
                    frame_index=max(0, int(result.frame_index)),
                    timestamp_s=item.frame.timestamp_s,
                    history_tokens=int(result.history_tokens),
                    fetched_fraction=float(result.fetched_fraction),
                    latency_ms=float(result.latency_ms),
                    ack_latency_ms=ack_ms,
                    frames_accepted=int(stats.get("frames_accepted", 0)),
                    frames_dropped=int(stats.get("frames_dropped", 0)) + live.frames_dropped_backpressure,
                ),
            )
        )
        if self.servicer.snapshot_due(live):  # after the ack: a snapshot never delays one
            await self.servicer.snapshot(live)

    async def _answer(self, item: _QuestionItem) -> None:
        live = self.live
        assert live is not None
        q, s = item.question, live.settings
        kwargs = dict(
            max_new_tokens=q.max_new_tokens or s.max_new_tokens,
            temperature=q.temperature if q.HasField("temperature") else s.temperature,
            top_p=q.top_p if q.HasField("top_p") else s.top_p,
            stop=tuple(q.stop) or tuple(s.stop),
        )
        start = time.monotonic()
        start_power_s = live.energy.clock()
        answers_before = self.servicer.backend.num_answers(live.engine_session)
        ttft_ms = 0.0
        parts: list[str] = []
        try:
            stream = live.engine_session.ask(q.text, **kwargs)
            try:
                async for delta in stream:
                    if not parts:
                        ttft_ms = (time.monotonic() - start) * 1000
                    parts.append(delta.text)
                    await self._emit(
                        pb.ServerEvent(
                            request_id=item.request_id,
                            answer_delta=pb.AnswerDelta(text=delta.text, token_id=int(delta.token_id)),
                        )
                    )
            finally:
                await stream.aclose()
        except Exception as exc:
            code, message = self.servicer.backend.status_of(exc)
            log_event("answer_error", logging.WARNING, session=live.id, code=code.name, error=repr(exc))
            # an answer that failed after its question was prefilled still closed its turn in
            # the history (what it generated stays): log it like any other, so a replay matches
            if self.servicer.backend.num_answers(live.engine_session) > answers_before:
                live.energy.record("answer", start_power_s, live.energy.clock())
                live.dirty = True
                await self._make_answer_durable(item.request_id, live, q.text)
            await self._emit(error_event(item.request_id, code, message))
            return
        total_ms = (time.monotonic() - start) * 1000
        live.energy.record("answer", start_power_s, live.energy.clock())
        live.dirty = True  # the question and answer are in the history now
        await self._make_answer_durable(item.request_id, live, q.text)  # before answer_done
        self.servicer.charge_energy(live)
        stats = answer_stats(live.engine_session)
        num_tokens = int(stats.pop("num_tokens", len(parts)))
        finish_reason = str(stats.pop("finish_reason", ""))
        fetched_text = float(stats.pop("fetched_fraction_text", 0.0))
        numeric = {
            k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self.servicer.metrics.answer(ttft_ms, total_ms, num_tokens)
        log_event(
            "answer",
            session=live.id,
            num_tokens=num_tokens,
            ttft_ms=round(ttft_ms, 1),
            total_ms=round(total_ms, 1),
        )
        await self._emit(
            pb.ServerEvent(
                request_id=item.request_id,
                answer_done=pb.AnswerDone(
                    text="".join(parts),
                    num_tokens=num_tokens,
                    finish_reason=finish_reason,
                    time_to_first_token_ms=ttft_ms,
                    total_ms=total_ms,
                    fetched_fraction_text=fetched_text,
                    stats=numeric,
                ),
            )
        )
        if self.servicer.snapshot_due(live):
            await self.servicer.snapshot(live)
