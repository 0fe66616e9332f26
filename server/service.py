"""The gRPC service: RPC methods that convert proto <-> engine, and the server's life cycle."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.backend import Backend, create_backend
from server.config import ServerConfig
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


class VRexServicer(pb_grpc.VRexServicer):
    def __init__(self, config: ServerConfig, backend: Backend, metrics: NullMetrics | None = None):
        self.config = config
        self.backend = backend
        self.metrics = metrics or NullMetrics()
        self.sessions: dict[str, LiveSession] = {}
        self.handlers: set[StreamHandler] = set()
        self._lock = asyncio.Lock()  # guards open/attach/release against each other

    @property
    def snapshots_enabled(self) -> bool:
        return self.config.data_dir is not None

    # ------------------------------------------------------------------ session registry

    async def open_new(self, settings: pb.SessionSettings) -> LiveSession:
        async with self._lock:
            if len(self.sessions) >= self.config.max_sessions:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"all {self.config.max_sessions} sessions are in use; close one or retry later",
                )
            try:
                engine_settings = self.backend.make_settings(
                    fps=settings.fps,
                    policy=settings.policy,
                    max_new_tokens=settings.max_new_tokens,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    stop=tuple(settings.stop),
                )
                engine_session = await self.backend.open_session(engine_settings)
            except Exception as exc:
                code, message = self.backend.status_of(exc)
                raise RequestError(code, message) from exc
            live = LiveSession(engine_session=engine_session, settings=settings, attached=True)
            self.sessions[live.id] = live
        self.metrics.session_opened()
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
        async with self._lock:
            live = self.sessions.get(session_id)
            if live is not None:
                return live, False
            if len(self.sessions) >= self.config.max_sessions:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"all {self.config.max_sessions} sessions are in use; close one before resuming {session_id}",
                )
            try:
                engine_session = await self.backend.resume(session_id)
            except KeyError as exc:
                hint = (
                    ""
                    if self.snapshots_enabled
                    else " (this server has no --data-dir, so nothing is resumable)"
                )
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND, f"no live session or snapshot with id {session_id}{hint}"
                ) from exc
            except Exception as exc:
                code, message = self.backend.status_of(exc)
                raise RequestError(code, message) from exc
            settings = _settings_of(engine_session, self.config)
            live = LiveSession(
                engine_session=engine_session, settings=settings, last_snapshot_s=time.monotonic()
            )
            self.sessions[live.id] = live
        self.metrics.session_opened()
        log_event("session_resume", session=live.id)
        return live, True

    async def snapshot(self, live: LiveSession) -> None:
        if not self.snapshots_enabled:
            return
        await self.backend.snapshot(live.engine_session)
        live.last_snapshot_s = time.monotonic()
        live.dirty = False

    async def release(self, live: LiveSession) -> bool:
        """Snapshot (if there is a data dir) and close the session; True if resumable."""
        resumable = False
        try:
            if self.snapshots_enabled:
                await self.snapshot(live)
                resumable = True
        finally:
            async with self._lock:
                if self.sessions.pop(live.id, None) is not None:
                    self.metrics.session_closed()
                    self.metrics.forget(live.id)
            await self.backend.close_session(live.engine_session)
        log_event("session_close", session=live.id, resumable=resumable)
        return resumable

    async def reap_idle(self) -> None:
        """Close resumed sessions that no stream attached to within idle_timeout_s."""
        now = time.monotonic()
        for live in list(self.sessions.values()):
            if not live.attached and now - live.last_used_s > self.config.idle_timeout_s:
                await self.release(live)

    async def shutdown_sessions(self) -> None:
        for handler in list(self.handlers):
            handler.begin_shutdown()

    async def release_all(self) -> None:
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
                device_kv_budget_bytes=self.config.device_kv_budget_bytes or 0,
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
        while True:
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
            getattr(servicer, name),
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def parse_client_event(data: bytes) -> pb.ClientEvent | MalformedEvent:
    try:
        return pb.ClientEvent.FromString(data)
    except Exception as exc:  # DecodeError, and anything else a hostile message may cause
        return MalformedEvent(len(data), str(exc) or type(exc).__name__)


async def create_server(
    config: ServerConfig, backend: Backend, metrics: NullMetrics | None = None
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
    servicer = VRexServicer(config, backend, metrics)
    add_servicer(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{config.host}:{config.port}"
    if config.tls_cert is not None:
        credentials = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ValueError(f"cannot listen on {address}; is the port in use? pick another with --port")
    return RunningServer(server, port, servicer, health_servicer)


async def serve(config: ServerConfig, backend: Backend | None = None) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully. Returns an exit code."""
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
    running = await create_server(config, backend, metrics)
    await running.start()
    if config.metrics_port is not None:
        metrics.start_http(config.host, config.metrics_port)
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
        model=info.get("name"),
        max_sessions=config.max_sessions,
        metrics_port=config.metrics_port,
    )
    if config.ready_file is not None:
        _write_atomic(Path(config.ready_file), json.dumps({"port": running.port, "pid": os.getpid()}))
    await stop.wait()
    await running.stop()
    return 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
