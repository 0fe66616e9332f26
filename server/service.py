"""The gRPC service: RPC methods that convert proto <-> engine, and the server's life cycle."""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import math
import os
import signal
import socket
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import retention, wal
from server.backend import Backend, create_backend
from server.config import ServerConfig
from server.energy import SessionEnergy, start_sampler
from server.images import SUPPORTED_FORMATS
from server.logs import log_event
from server.metrics import NullMetrics, make_metrics
from server.session import (
    LiveSession,
    MalformedEvent,
    RequestError,
    StreamHandler,
    check_session_id,
    effective_settings,
)
from vrex.api import vrex_pb2 as pb
from vrex.api import vrex_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VRex"].full_name  # "vrex.v1.VRex"
PRUNE_PERIOD_S = 60.0  # how often closed sessions are checked against --keep-closed


class VRexServicer(pb_grpc.VRexServicer):
    def __init__(
        self,
        config: ServerConfig,
        backend: Backend,
        metrics: NullMetrics | None = None,
        power_sampler=None,
    ):
        self.config = config
        self.backend = backend
        self.metrics = metrics or NullMetrics()
        self.power_sampler = power_sampler  # vrex.power.PowerSampler, started; None: none here
        self.metrics.power_sampler(power_sampler)
        self.sessions: dict[str, LiveSession] = {}
        self.handlers: set[StreamHandler] = set()
        self._lock = asyncio.Lock()  # guards the registry below; never held across engine work
        self._num_reserved = 0  # slots held by opens and restores not yet in `sessions`
        self._restoring: dict[str, asyncio.Task] = {}  # session id -> its restore in flight
        self._closing: dict[str, asyncio.Event] = {}  # session id -> set once it is released

    @property
    def snapshots_enabled(self) -> bool:
        return self.config.data_dir is not None

    @property
    def wal_enabled(self) -> bool:
        return self.snapshots_enabled and self.config.durability == "wal"

    # ------------------------------------------------------------------ durability

    async def make_frame_durable(self, live: LiveSession, frame: pb.Frame, result) -> None:
        """Called before an accepted frame is acked: log it (wal) or snapshot (snapshot)."""
        if live.wal is not None:
            record = wal.frame_record(frame.SerializeToString(), result.frame_index, frame.timestamp_s)
            await self._log(live, record, f"frame {result.frame_index}")
        elif self.snapshots_enabled and self.config.durability == "snapshot":
            await self.snapshot(live)
        elif self.snapshots_enabled and self.config.durability == "interval":
            if time.monotonic() - live.last_snapshot_s >= self.config.snapshot_interval_s:
                await self.snapshot(live)

    async def make_answer_durable(self, live: LiveSession, question: str) -> None:
        """Called after an answer's last token, before answer_done: log its history tokens."""
        if live.wal is None:
            return  # snapshot modes: the next snapshot holds it
        token_ids, answer_index = self.backend.answer_history(live.engine_session)
        record = wal.answer_record(question, token_ids, answer_index)
        await self._log(live, record, f"answer {answer_index}")

    async def _log(self, live: LiveSession, record: wal.WalRecord, what: str) -> None:
        """Append a record the session already holds. If the log cannot take it (a full or
        failing disk), a full snapshot, which holds it and everything before, stands in; until
        one succeeds no ack goes out, so an acked record is always durable and the log never
        skips one (a record missing from the middle would replay a different history)."""
        if not live.snapshot_before_ack:
            try:
                await asyncio.to_thread(live.wal.append, record)
                return
            except OSError as exc:
                live.snapshot_before_ack = True
                log_event("wal_append_failed", logging.ERROR, session=live.id, error=repr(exc))
        try:
            await self.snapshot(live)
        except Exception as exc:
            full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED if full else grpc.StatusCode.UNAVAILABLE,
                f"{what} is in the session but not durable: the disk under --data-dir failed ({exc}); "
                "no ack goes out until a snapshot succeeds (free space there); do not send it again",
            ) from exc
        live.snapshot_before_ack = False

    def snapshot_due(self, live: LiveSession) -> bool:
        """wal: the log holds snapshot_every_frames records, or the last snapshot is too old."""
        if live.wal is None or not live.dirty:
            return False
        interval = self.config.snapshot_interval_s
        return live.wal.num_records >= self.config.snapshot_every_frames or (
            interval > 0 and time.monotonic() - live.last_snapshot_s >= interval
        )

    def charge_energy(self, live: LiveSession) -> None:
        for kind, energy_mj in live.energy.settle():
            self.metrics.energy(kind, energy_mj)

    async def _open_wal(self, live: LiveSession) -> wal.LogContents:
        log = await asyncio.to_thread(wal.WriteAheadLog, wal.wal_path(self.config.data_dir, live.id))
        live.wal = log
        return log.recovered

    # ------------------------------------------------------------------ session registry
    #
    # Slots: a session counts against max_sessions from the moment its open or restore is
    # reserved (`_num_reserved`) until it is released, so concurrent opens and resumes cannot
    # overshoot the limit. `_lock` is held only over short sections that never await (reserve a
    # slot, publish a session, drop one); engine work — opening, restoring a snapshot and
    # replaying a write-ahead log — runs outside it, so a long replay never blocks other sessions.

    def _reserve_slot(self, what_to_do: str) -> None:
        """Count one more session against max_sessions; call with `_lock` held."""
        if len(self.sessions) + self._num_reserved >= self.config.max_sessions:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"all {self.config.max_sessions} sessions are in use; {what_to_do}",
            )
        self._num_reserved += 1

    async def open_new(self, settings: pb.SessionSettings) -> LiveSession:
        async with self._lock:
            self._reserve_slot("close one or retry later")
        published = False
        try:
            try:
                engine_settings = self.backend.make_settings(
                    fps=settings.fps,
                    policy=settings.policy,
                    max_new_tokens=settings.max_new_tokens,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    stop=tuple(settings.stop),
                    resv_preset=self.config.resv_preset,
                )
                engine_session = await self.backend.open_session(engine_settings)
            except Exception as exc:
                code, message = self.backend.status_of(exc)
                raise RequestError(code, message) from exc
            live = LiveSession(
                engine_session=engine_session,
                settings=settings,
                attached=True,
                energy=SessionEnergy(self.power_sampler),
            )
            async with self._lock:
                self._num_reserved -= 1
                self.sessions[live.id] = live
                published = True
        finally:
            if not published:  # no await here: the slot is freed even when cancelled
                self._num_reserved -= 1
        self.metrics.session_opened()
        if self.wal_enabled:
            # a base snapshot, so the log always has one to replay onto
            try:
                await self.snapshot(live)
                contents = await self._open_wal(live)
                if contents.records:  # a new id cannot have a log; never replay a stranger's
                    await asyncio.to_thread(live.wal.truncate)
            except Exception as exc:
                await self.release(live, snapshot=False)
                raise RequestError(
                    grpc.StatusCode.INTERNAL,
                    f"cannot make session {live.id} durable in --data-dir ({exc}); check the folder",
                ) from exc
        log_event("session_open", session=live.id, fps=settings.fps, policy=settings.policy)
        return live

    async def attach(self, session_id: str) -> tuple[LiveSession, bool]:
        """Attach a stream to a live or snapshotted session; returns (session, resumed)."""
        live, resumed = await self.restore(session_id)
        if live.attached:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {session_id} is attached to another stream; close that stream first",
            )
        live.attached = True
        live.last_used_s = time.monotonic()
        return live, resumed

    async def restore(self, session_id: str) -> tuple[LiveSession, bool]:
        """The live session `session_id`, or that session restored from its snapshot (and its
        write-ahead log replayed); returns (session, resumed).

        Concurrent calls for one id share one restore, so they all get the same session or the
        same error. A session being released is waited for, then restored from the snapshot
        its release just wrote.

        Raises:
            RequestError: NOT_FOUND (no such session), RESOURCE_EXHAUSTED (no free slot),
                DATA_LOSS (its log does not replay), or the engine's error mapped to a status.
        """
        while True:
            async with self._lock:
                closing = self._closing.get(session_id)
                if closing is None:
                    live = self.sessions.get(session_id)
                    if live is not None:
                        return live, False
                    task = self._restoring.get(session_id)
                    if task is None:
                        self._reserve_slot(f"close one before resuming {session_id}")
                        task = asyncio.create_task(self._restore(session_id), name=f"restore {session_id}")
                        self._restoring[session_id] = task
                        task.add_done_callback(functools.partial(self._restore_done, session_id))
            if closing is None:
                break
            await closing.wait()
        # asyncio.wait, not a plain await: a caller that goes away (deadline, disconnect) leaves
        # the restore running for the others; if nobody attaches, the idle reaper closes it
        await asyncio.wait((task,))
        if task.cancelled():  # the server is stopping (release_all), not this caller
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"the server stopped while resuming {session_id}; resume it again once it is back",
            )
        return task.result(), True

    def _forget_restore(self, session_id: str, task: asyncio.Task) -> None:
        """Drop a restore's entry and its reserved slot; idempotent, and never awaits."""
        if self._restoring.get(session_id) is task:
            del self._restoring[session_id]
            self._num_reserved -= 1

    def _restore_done(self, session_id: str, task: asyncio.Task) -> None:
        # A restore cancelled before it started never ran its own clean-up; and an error nobody
        # waited for (every caller went away) must not be logged as "never retrieved".
        self._forget_restore(session_id, task)
        if not task.cancelled():
            task.exception()

    async def _restore(self, session_id: str) -> LiveSession:
        """One restore, run as its own task with a slot reserved by `restore`."""
        task = asyncio.current_task()
        engine_session = None
        live = None
        try:
            try:
                engine_session = await self.backend.resume(session_id)
            except KeyError as exc:
                hint = (
                    self._pruning_hint()
                    if self.snapshots_enabled
                    else " (this server has no --data-dir, so nothing is resumable)"
                )
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND, f"no live session or snapshot with id {session_id}{hint}"
                ) from exc
            except Exception as exc:
                code, message = self.backend.status_of(exc)
                raise RequestError(code, message) from exc
            live = LiveSession(
                engine_session=engine_session,
                settings=_settings_of(engine_session, self.config),
                last_snapshot_s=time.monotonic(),
                energy=SessionEnergy(self.power_sampler),
            )
            replayed = await self._replay_log(live) if self.wal_enabled else None
            async with self._lock:
                self._forget_restore(session_id, task)
                live.last_used_s = time.monotonic()  # the reaper's clock starts now, not before replay
                self.sessions[live.id] = live
        except BaseException:
            # nothing half-registered: free the slot, close the log and the engine session
            self._forget_restore(session_id, task)
            if live is not None and live.wal is not None:
                live.wal.close()
                live.wal = None
            if engine_session is not None:
                try:
                    await self.backend.close_session(engine_session)
                except Exception:
                    logging.getLogger("vrex.server").exception(
                        "failed to close session %s after its restore failed", session_id
                    )
            raise
        self.metrics.session_opened()
        log_event("session_resume", session=live.id, **(vars(replayed) if replayed else {}))
        return live

    def _pruning_hint(self) -> str:
        keep_s = self.config.keep_closed_s
        if keep_s is None:
            return ""
        return f" (closed sessions are deleted {keep_s / 3600:g} h after their last snapshot: --keep-closed)"

    async def _replay_log(self, live: LiveSession) -> wal.ReplayReport:
        """Bring a restored session up to its last acknowledged record (see server/wal.py).
        On failure the caller closes the log and the session."""
        t0 = time.monotonic()
        try:
            contents = await self._open_wal(live)
            report = await wal.replay(self.backend, live.engine_session, contents)
        except Exception as exc:
            log_event("wal_replay_failed", logging.ERROR, session=live.id, error=repr(exc))
            raise RequestError(
                grpc.StatusCode.DATA_LOSS,
                f"session {live.id}: its write-ahead log {wal.wal_path(self.config.data_dir, live.id)} "
                f"does not replay onto its snapshot ({exc}); move the log away to resume from the "
                "snapshot alone (frames acked after it are then lost)",
            ) from exc
        live.dirty = bool(report.frames_replayed or report.answers_replayed)
        log_event(
            "wal_replayed",
            session=live.id,
            frames=report.frames_replayed,
            answers=report.answers_replayed,
            skipped=report.records_skipped,
            torn_bytes=report.torn_bytes,
            seconds=round(time.monotonic() - t0, 3),
        )
        return report

    async def snapshot(self, live: LiveSession) -> None:
        """A full snapshot; with the write-ahead log, the log is emptied after it (a crash in
        between is safe: replay skips the records the snapshot holds)."""
        if not self.snapshots_enabled:
            return
        if self.backend.broken(live.engine_session):
            return  # its last good snapshot and log are what a resume goes back to
        t0 = time.monotonic()
        await self.backend.snapshot(live.engine_session)
        if live.wal is not None:
            num_records = live.wal.num_records
            await asyncio.to_thread(live.wal.truncate)
            log_event(
                "snapshot",
                session=live.id,
                wal_records=num_records,
                seconds=round(time.monotonic() - t0, 3),
            )
        live.last_snapshot_s = time.monotonic()
        live.dirty = False

    async def release(self, live: LiveSession, snapshot: bool = True) -> bool:
        """Snapshot (if there is a data dir) and close the session; True if resumable.

        Until it is closed, `restore` of the same id waits, so a client that reconnects at once
        gets the session back from this snapshot, never the engine session being closed."""
        closing = self._closing.get(live.id)
        owns_closing = closing is None  # a second release of the same session leaves it be
        if owns_closing:
            closing = self._closing[live.id] = asyncio.Event()
        resumable = False
        try:
            try:
                if self.snapshots_enabled and snapshot:
                    await self.snapshot(live)
                    # a broken session is not snapshotted: its last snapshot (if any) is kept
                    resumable = not self.backend.broken(live.engine_session) or self.backend.has_snapshot(
                        live.id
                    )
            finally:
                if live.wal is not None:
                    live.wal.close()
                    live.wal = None
                async with self._lock:
                    if self.sessions.pop(live.id, None) is not None:
                        self.metrics.session_closed()
                        self.metrics.forget(live.id)
                await self.backend.close_session(live.engine_session)
        finally:
            if owns_closing:
                del self._closing[live.id]
                closing.set()
        log_event("session_close", session=live.id, resumable=resumable)
        return resumable

    async def reap_idle(self) -> None:
        """Close resumed sessions that no stream attached to within idle_timeout_s."""
        now = time.monotonic()
        for live in list(self.sessions.values()):
            if not live.attached and now - live.last_used_s > self.config.idle_timeout_s:
                await self.release(live)

    async def prune_closed(self) -> None:
        """Delete snapshots and logs of sessions closed more than --keep-closed ago."""
        keep_s, data_dir = self.config.keep_closed_s, self.config.data_dir
        if keep_s is None or data_dir is None:
            return
        async with self._lock:  # no open, restore or release of these ids can start meanwhile
            busy = set(self.sessions) | set(self._restoring) | set(self._closing)
            doomed = await asyncio.to_thread(retention.expired, Path(data_dir), keep_s, busy)
            moved = {sid: await asyncio.to_thread(retention.set_aside, Path(data_dir), sid) for sid in doomed}
        for sid, paths in moved.items():
            freed = await asyncio.to_thread(retention.delete, paths)
            log_event("session_pruned", session=sid, bytes_freed=freed, keep_closed_s=keep_s)

    async def shutdown_sessions(self) -> None:
        for handler in list(self.handlers):
            handler.begin_shutdown()

    async def release_all(self) -> None:
        # Restores still running are cancelled: their snapshot and log stay on disk as they were.
        restoring = list(self._restoring.values())
        for task in restoring:
            task.cancel()
        await asyncio.gather(*restoring, return_exceptions=True)
        for live in list(self.sessions.values()):
            try:
                await self.release(live)
            except Exception:
                logging.getLogger("vrex.server").exception("failed to release %s at shutdown", live.id)

    # ------------------------------------------------------------------ RPCs

    async def Stream(self, request_iterator, context):
        await context.send_initial_metadata(())  # lets clients see the call was accepted
        handler = StreamHandler(self, context)
        async for event in handler.run(request_iterator):
            yield event

    async def GetServerInfo(self, request, context):
        info = self.backend.model_info
        limits = self.config.limits
        return pb.ServerInfo(
            model_name=str(info.get("name", "")),
            is_demo_model=bool(info.get("is_demo", False)),
            model_notice=str(info.get("notice", "")),
            num_layers=int(info.get("num_layers", 0) or 0),
            visual_tokens_per_frame=int(info.get("visual_tokens_per_frame", 0) or 0),
            limits=pb.Limits(
                max_sessions=self.config.max_sessions,
                max_frame_bytes=limits.max_frame_bytes,
                max_frame_pixels=limits.max_frame_pixels,
                max_question_chars=limits.max_question_chars,
                max_new_tokens=limits.max_new_tokens,
                max_message_bytes=limits.max_message_bytes,
                device_kv_budget_bytes=self.backend.device_kv_budget_bytes or 0,
                max_question_tokens=self.backend.max_question_tokens or 0,
            ),
            version=_version(),
            grpc_version=grpc.__version__,
            auth_required=self.config.auth_required,
            live_sessions=len(self.sessions),
            snapshots_enabled=self.snapshots_enabled,
            image_formats=[f.lower() for f in SUPPORTED_FORMATS] + ["raw-rgb"],
        )

    async def GetSessionStats(self, request, context):
        await _check_id_or_abort(request.session_id, context)
        live = self.sessions.get(request.session_id)
        if live is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no live session {request.session_id}; resume it with ResumeSession or open a new one",
            )
        return stats_message(live)

    async def ResumeSession(self, request, context):
        await _check_id_or_abort(request.session_id, context)
        try:
            live, resumed = await self.restore(request.session_id)
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
        stats = live.stats()
        return pb.SessionInfo(
            session_id=live.id,
            resumed=resumed,
            frames_accepted=int(stats.get("frames_accepted", 0)),
            history_tokens=int(stats.get("history_tokens", 0)),
        )


async def _check_id_or_abort(session_id: str, context) -> None:
    try:
        check_session_id(session_id)
    except RequestError as exc:
        await context.abort(exc.code, exc.message)


def stats_message(live: LiveSession) -> pb.SessionStats:
    stats = live.stats()
    known = {
        "frames_accepted",
        "frames_dropped",
        "history_tokens",
        "fetched_fraction_frame",
        "fetched_fraction_text",
        "kv_bytes",
        "power_sampler",
        "power_note",
    }
    kv = stats.get("kv_bytes", {}) or {}
    extra = {
        k: float(v)
        for k, v in stats.items()
        if k not in known and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return pb.SessionStats(
        session_id=live.id,
        frames_accepted=int(stats.get("frames_accepted", 0)),
        frames_dropped=int(stats.get("frames_dropped", 0)) + live.frames_dropped_backpressure,
        frames_dropped_backpressure=live.frames_dropped_backpressure,
        history_tokens=int(stats.get("history_tokens", 0)),
        fetched_fraction_frame=float(stats.get("fetched_fraction_frame", 0.0) or 0.0),
        fetched_fraction_text=float(stats.get("fetched_fraction_text", 0.0) or 0.0),
        kv_bytes={str(k): int(v) for k, v in kv.items()},
        attached=live.attached,
        extra=extra,
        power_sampler=str(stats.get("power_sampler") or ""),
        power_note=str(stats.get("power_note") or ""),
    )


def _settings_of(engine_session, config: ServerConfig) -> pb.SessionSettings:
    s = getattr(engine_session, "settings", None)
    if s is None:
        return effective_settings(pb.SessionSettings(), config.limits.max_new_tokens, config.limits.max_fps)
    return pb.SessionSettings(
        fps=float(s.fps),
        policy=str(s.policy),
        max_new_tokens=int(s.max_new_tokens),
        temperature=float(s.temperature),
        top_p=float(s.top_p),
        stop=list(s.stop),
    )


def _version() -> str:
    try:
        from vrex import __version__

        return str(__version__)
    except ImportError:
        return "unknown"


class RunningServer:
    """What `create_server` returns: the grpc server, its port and the pieces tests poke."""

    def __init__(self, server: grpc.aio.Server, port: int, servicer: VRexServicer, health_servicer):
        self.server = server
        self.port = port
        self.servicer = servicer
        self.health = health_servicer
        self._reaper: asyncio.Task | None = None

    async def start(self) -> None:
        await self.server.start()
        self._reaper = asyncio.create_task(self._reap_loop())

    async def _reap_loop(self) -> None:
        period_s = max(0.5, min(5.0, self.servicer.config.idle_timeout_s / 4))
        pruned_s = -math.inf
        while True:
            try:
                if time.monotonic() - pruned_s >= PRUNE_PERIOD_S:
                    pruned_s = time.monotonic()
                    await self.servicer.prune_closed()
            except Exception:
                logging.getLogger("vrex.server").exception("pruning closed sessions failed")
            await asyncio.sleep(period_s)
            try:
                await self.servicer.reap_idle()
            except Exception:
                logging.getLogger("vrex.server").exception("idle reaper failed")

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new calls, let answers in flight finish within
        the grace period, then snapshot and close every session."""
        grace = self.servicer.config.grace_s if grace_s is None else grace_s
        log_event("server_stopping", grace_s=grace, live_sessions=len(self.servicer.sessions))
        await self.health.enter_graceful_shutdown()
        await self.servicer.shutdown_sessions()
        await self.server.stop(grace)
        if self._reaper is not None:
            self._reaper.cancel()
        await self.servicer.release_all()
        await self.servicer.backend.close()
        if self.servicer.power_sampler is not None:
            await asyncio.to_thread(self.servicer.power_sampler.stop)
        log_event("server_stopped")


def add_servicer(servicer: VRexServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_VRexServicer_to_server, but a Stream message that does not parse
    becomes a per-request error instead of ending the call (the session goes on)."""
    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(
            servicer.Stream,
            request_deserializer=parse_client_event,
            response_serializer=pb.ServerEvent.SerializeToString,
        ),
    }
    for name, request_type, response_type in (
        ("GetServerInfo", pb.ServerInfoRequest, pb.ServerInfo),
        ("GetSessionStats", pb.SessionStatsRequest, pb.SessionStats),
        ("ResumeSession", pb.ResumeSessionRequest, pb.SessionInfo),
    ):
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            _refusing_malformed(getattr(servicer, name)),
            request_deserializer=_parser(request_type),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _parser(message_type):
    """A deserializer that hands a message that does not parse to the handler as a
    MalformedEvent (gRPC itself would end the call with UNKNOWN)."""

    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as exc:  # DecodeError, and anything else a hostile message may cause
            return MalformedEvent(data, str(exc) or type(exc).__name__, message_type.DESCRIPTOR.name)

    return parse


parse_client_event = _parser(pb.ClientEvent)


def _refusing_malformed(method):
    async def call(request, context):
        if isinstance(request, MalformedEvent):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
        return await method(request, context)

    return call


async def create_server(
    config: ServerConfig, backend: Backend, metrics: NullMetrics | None = None, power_sampler=None
) -> RunningServer:
    """Build (not start) the server on config.host:config.port; port 0 picks a free port."""
    interceptors = []
    if config.api_keys:
        from server.auth import ApiKeyInterceptor

        interceptors.append(ApiKeyInterceptor(config.api_keys))
    options = [
        ("grpc.max_receive_message_length", config.limits.max_message_bytes),
        ("grpc.max_send_message_length", config.limits.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    servicer = VRexServicer(config, backend, metrics, power_sampler)
    add_servicer(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    host = config.host.strip("[]")
    address = f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}"  # IPv6 in brackets
    credentials = None
    if config.tls_cert is not None:
        credentials = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
        )
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc says only "Failed to bind"; older versions return 0
        port = 0
    if port == 0:
        await server.stop(None)  # else its __del__ schedules a shutdown on a closed event loop
        raise listen_error(config.host, config.port, "--port")
    return RunningServer(server, port, servicer, health_servicer)


def check_can_listen(config: ServerConfig) -> None:
    """Raise ValueError saying what to change when --host/--port or --metrics-port cannot be
    bound now (the real binds still check: another process may take a port meanwhile)."""
    for port, flag in ((config.port, "--port"), (config.metrics_port, "--metrics-port")):
        if port is not None:
            cause = _bind_probe(config.host.strip("[]"), port)
            if cause is not None:
                raise listen_error(config.host, port, flag, cause)


def listen_error(host: str, port: int, port_flag: str, cause: OSError | None = None) -> ValueError:
    """Why `host:port` cannot be listened on, naming the flag to change. Without `cause`,
    binding a plain socket finds out (grpc does not say why)."""
    if cause is None:
        cause = _bind_probe(host.strip("[]"), port)
    if isinstance(cause, socket.gaierror) or (cause is not None and cause.errno == errno.EADDRNOTAVAIL):
        return ValueError(
            f"cannot listen on {host}: it is not an address of this machine; pass --host 127.0.0.1 "
            "(this machine only), 0.0.0.0 (every interface) or one of its own addresses"
        )
    if cause is not None and cause.errno == errno.EADDRINUSE:
        free = " 0 for a free one or" if port_flag == "--port" else ""  # a free metrics port is not reported
        return ValueError(f"port {port} on {host} is in use; pass {port_flag}{free} another port")
    if cause is not None and cause.errno == errno.EACCES:
        return ValueError(
            f"port {port} on {host} needs privileges this process lacks; pass {port_flag} 1024 or above"
        )
    why = f" ({cause.strerror or cause})" if cause is not None else ""
    return ValueError(f"cannot listen on {host}:{port}{why}; check --host and {port_flag}")


def _bind_probe(host: str, port: int) -> OSError | None:
    """The error binding `host:port` gives, or None when it binds now."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc: TIME_WAIT is no obstacle
            probe.bind(address)
    except OSError as exc:
        return exc
    return None


async def serve(config: ServerConfig, backend: Backend | None = None) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully. Returns an exit code."""
    check_can_listen(config)  # before the engine loads, which may take minutes
    lock = retention.DataDirLock(Path(config.data_dir)) if config.data_dir is not None else None
    try:
        if lock is not None:
            cleaned = await asyncio.to_thread(retention.clean_scratch, Path(config.data_dir))
            if cleaned["paths"]:
                log_event("data_dir_cleaned", files=cleaned["paths"], bytes_freed=cleaned["bytes"])
        return await _serve(config, backend)
    finally:
        if lock is not None:
            lock.release()


async def _serve(config: ServerConfig, backend: Backend | None) -> int:
    metrics = make_metrics(config.metrics_port is not None)
    if backend is None:
        t0 = time.monotonic()
        backend = await asyncio.to_thread(create_backend, config)
        log_event("engine_loaded", seconds=round(time.monotonic() - t0, 2))
    info = backend.model_info
    if info.get("is_demo"):
        log_event(
            "demo_model",
            logging.WARNING,
            model=info.get("name"),
            notice=info.get("notice")
            or "no --model given: serving the embedded demo model; it answers text but cannot really see",
        )
    sampler = await asyncio.to_thread(start_sampler)  # None off a Jetson: stats say so
    try:
        running = await create_server(config, backend, metrics, sampler)
    except BaseException:
        await _close_unserved(backend, sampler)
        raise
    if config.metrics_port is not None:
        try:  # before the gRPC server starts, so a failure here has no client to disturb
            metrics.start_http(config.host.strip("[]"), config.metrics_port)
        except OSError as exc:
            await running.server.stop(None)
            await _close_unserved(backend, sampler)
            raise listen_error(config.host, config.metrics_port, "--metrics-port", exc) from None
    await running.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log_event(
        "server_listening",
        host=config.host,
        port=running.port,
        tls=config.tls_cert is not None,
        auth=config.auth_required,
        data_dir=str(config.data_dir) if config.data_dir else None,
        trace_dir=str(config.trace_dir) if config.trace_dir else None,
        model=info.get("name"),
        max_sessions=config.max_sessions,
        resv_preset=config.resv_preset,
        metrics_port=config.metrics_port,
        durability=config.durability if config.data_dir else None,
        device_kv_budget_bytes=backend.device_kv_budget_bytes,
        power_sampler=sampler.source if sampler is not None else None,
    )
    if config.ready_file is not None:
        try:
            _write_atomic(Path(config.ready_file), json.dumps({"port": running.port, "pid": os.getpid()}))
        except OSError as exc:  # checked at start; the folder may have gone since
            await running.stop()
            raise ValueError(
                f"--ready-file {config.ready_file}: cannot write it ({exc.strerror or exc})"
            ) from None
    await stop.wait()
    await running.stop()
    return 0


async def _close_unserved(backend: Backend, power_sampler) -> None:
    """Start-up failed before serving: stop what already runs, so the process can exit."""
    await backend.close()
    if power_sampler is not None:
        await asyncio.to_thread(power_sampler.stop)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
