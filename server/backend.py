"""The one place the server touches `vrex.engine`: loading it and adapting its calls.

`vrex serve` always uses the real engine. Tests may set VREX_TEST_FAKE_ENGINE=1 (or a path
to a module) to load the test double in tests/server/fake_engine.py instead; that switch is
for the test suite only and is logged loudly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from server.config import ServerConfig

log = logging.getLogger("vrex.server")

FAKE_ENGINE_ENV = "VREX_TEST_FAKE_ENGINE"


class EngineUnavailable(RuntimeError):
    """vrex.engine cannot be imported (not installed, or a dependency is missing)."""


def load_engine_module() -> ModuleType:
    """The real `vrex.engine`, or the test double when VREX_TEST_FAKE_ENGINE is set."""
    fake = os.environ.get(FAKE_ENGINE_ENV, "")
    if fake:
        path = (
            Path(fake)
            if fake not in ("1", "true", "yes")
            else Path(__file__).resolve().parents[1] / "tests" / "server" / "fake_engine.py"
        )
        log.warning(
            "using the TEST fake engine from %s (%s is set); never do this in production",
            path,
            FAKE_ENGINE_ENV,
        )
        spec = importlib.util.spec_from_file_location("vrex_test_fake_engine", path)
        if spec is None or spec.loader is None:
            raise EngineUnavailable(f"{FAKE_ENGINE_ENV}={fake}: no module at {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
        return module
    try:
        # vrex.engine loads its torch-backed modules on first use; load them now so a missing
        # dependency is reported here, with the hint below
        importlib.import_module("vrex.engine.engine")
        return importlib.import_module("vrex.engine")
    except ImportError as exc:
        raise EngineUnavailable(
            f"cannot import vrex.engine ({exc}); install vrex with its model dependencies "
            "(pip install 'vrex[demo,server]') and try again"
        ) from exc


@dataclass
class Backend:
    """The engine plus the names of its types, so the server never imports them directly."""

    module: ModuleType
    engine: Any

    @property
    def capacity_error(self) -> type[BaseException]:
        return getattr(self.module, "CapacityError", MemoryError)

    @property
    def snapshot_error(self) -> type[BaseException] | tuple:
        return getattr(self.module, "SnapshotError", ())

    @property
    def session_broken_error(self) -> type[BaseException] | tuple:
        return getattr(self.module, "SessionBrokenError", ())

    @property
    def model_info(self) -> dict:
        return dict(self.engine.model_info)

    def make_settings(self, **kwargs: Any) -> Any:
        return self.module.SessionSettings(**kwargs)

    async def open_session(self, settings: Any) -> Any:
        return await maybe_await(self.engine.open_session(settings))

    async def resume(self, session_id: str) -> Any:
        if inspect.iscoroutinefunction(self.engine.resume):
            return await self.engine.resume(session_id)
        # reading a snapshot takes a while: off the event loop, between other sessions' steps
        return await self.on_model_thread(self.engine.resume, session_id)

    async def on_model_thread(self, fn: Any, *args: Any) -> Any:
        # the engine's model thread when it has one: work that reads or changes the KV store must
        # not block the event loop nor overlap another session's step
        runner = getattr(self.engine, "run", None)
        if runner is not None and inspect.iscoroutinefunction(runner):
            return await runner(fn, *args)
        return await maybe_await(fn(*args))

    async def snapshot(self, session: Any) -> None:
        await self.on_model_thread(session.snapshot)

    @staticmethod
    def broken(session: Any) -> str | None:
        """Why the engine session takes no more steps (it lost one half-way), or None."""
        return getattr(session, "broken", None)

    def has_snapshot(self, session_id: str) -> bool:
        lister = getattr(self.engine, "list_snapshots", None)
        return lister is not None and session_id in lister()

    @property
    def device_kv_budget_bytes(self) -> int | None:
        """The per-session device KV budget the engine uses (after `auto` was resolved)."""
        return getattr(getattr(self.engine, "config", None), "device_kv_budget_bytes", None)

    @property
    def max_question_tokens(self) -> int | None:
        """The longest question the engine takes, in the model's tokens."""
        return getattr(getattr(self.engine, "config", None), "max_question_tokens", None)

    def next_frame_index(self, session: Any) -> int:
        """The index the engine gives the session's next frame: it numbers every frame it takes,
        kept or dropped by its sampler."""
        index = getattr(session, "frame_index", None)
        if isinstance(index, int):
            return index
        stats = session.stats()  # an engine without the counter: exact unless a log was replayed
        return int(stats.get("frames_accepted", 0)) + int(stats.get("frames_dropped", 0))

    # -- write-ahead log replay (server/wal.py) ---------------------------------------------
    async def replay_frame(self, session: Any, image: Any, timestamp_s: float, frame_index: int) -> bool:
        """Prefill a logged frame again; False when the restored snapshot already holds it."""
        return bool(await self.on_model_thread(session.replay_frame, image, timestamp_s, frame_index))

    async def replay_answer(
        self, session: Any, question: str, token_ids: list[int], answer_index: int
    ) -> bool:
        """Prefill a logged question and its answer tokens again; False when already held."""
        return bool(await self.on_model_thread(session.replay_answer, question, token_ids, answer_index))

    def num_answers(self, session: Any) -> int:
        """Answers in the session's history, including those that ended in an error."""
        return int(session.stats().get("answers", 0))

    def answer_history(self, session: Any) -> tuple[list[int], int]:
        """(token ids the last answer put into the history, its answer index) for the log."""
        raw = getattr(session, "last_answer_stats", None)
        ids = (
            raw.get("history_token_ids") if isinstance(raw, dict) else getattr(raw, "history_token_ids", None)
        )
        if ids is None:
            raise RuntimeError(
                "the engine does not report the answer's history tokens (history_token_ids); "
                "it is too old for --durability wal: update vrex or use --durability snapshot"
            )
        return [int(t) for t in ids], self.num_answers(session) - 1

    async def close_session(self, session: Any) -> None:
        closer = getattr(self.engine, "close_session", None)
        if closer is not None:  # the real engine: also drops it from its session table
            await maybe_await(closer(session.id))
        else:
            await maybe_await(session.close())

    async def close(self) -> None:
        for name in ("shutdown", "close"):
            closer = getattr(self.engine, name, None)
            if closer is not None:
                await asyncio.to_thread(closer)
                return

    def status_of(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        """Map an engine exception to a gRPC status and a message that says what to do."""
        if isinstance(exc, self.capacity_error):
            return grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"server is at capacity ({exc}); close another session or retry later"
            )
        if isinstance(exc, self.session_broken_error):
            return grpc.StatusCode.FAILED_PRECONDITION, (
                f"{exc} (to resume: end this stream, then open one with Open.resume_session_id set to this "
                "session's id; without --data-dir, open a new session)"
            )
        if isinstance(exc, self.snapshot_error):  # before ValueError, which it is
            return grpc.StatusCode.DATA_LOSS, f"{exc}; this session cannot be restored: open a new session"
        if isinstance(exc, KeyError):
            return grpc.StatusCode.NOT_FOUND, f"no such session {exc}; open a new session instead"
        if isinstance(exc, ValueError):
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        return grpc.StatusCode.INTERNAL, f"engine error {type(exc).__name__}: {exc}; see the server log"


async def maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def create_backend(config: ServerConfig) -> Backend:
    """Build the engine for `config` (loads the model; may take a while).

    With `device_kv_budget_auto`, the per-session device KV budget is sized once the model is
    loaded: free memory then (vrex.memory.device_kv_budget_auto: MemAvailable on CPU and Jetson,
    torch.cuda.mem_get_info on a discrete GPU) minus the headroom max(1 GiB, 10% of total),
    divided by --max-sessions, so every session can fill its device tier at once.
    """
    module = load_engine_module()
    engine_config = module.EngineConfig(
        model_dir=config.model_dir,
        device=config.device,
        dtype=config.dtype,
        device_kv_budget_bytes=None if config.device_kv_budget_auto else config.device_kv_budget_bytes,
        host_kv_budget_bytes=config.host_kv_budget_bytes,
        data_dir=config.data_dir,
        max_sessions=config.max_sessions,
        trace_dir=str(config.trace_dir) if config.trace_dir else None,
    )
    engine = module.Engine(engine_config)
    if config.device_kv_budget_auto:
        per_session = auto_device_kv_budget(config.device, config.max_sessions)
        # Sessions read the budget when they open, so setting it after the load is enough.
        engine.config = dataclasses.replace(engine.config, device_kv_budget_bytes=per_session)
    check = getattr(engine, "check_device_budget", None)
    if check is not None:  # refuse now a budget every session would fail to open with
        check(module.SessionSettings())
    return Backend(module=module, engine=engine)


def auto_device_kv_budget(device: str, max_sessions: int) -> int:
    """`--device-kv-budget auto`, per session; logs what it chose (event device_kv_budget_auto).

    Call after the model is loaded.
    """
    from vrex import memory

    free, total, source = memory.free_and_total_bytes(device)
    headroom = max(memory.DEFAULT_HEADROOM_BYTES, int(memory.DEFAULT_HEADROOM_FRACTION * total))
    budget = memory.device_kv_budget_auto(device=device)
    per_session = budget // max_sessions
    if per_session <= 0:
        raise ValueError(
            f"--device-kv-budget auto: {free} bytes free ({source}) after the model loaded, less than "
            f"the {headroom}-byte headroom plus one byte per session; free memory, lower --max-sessions "
            "or pass an explicit size such as 512MiB"
        )
    from server.logs import log_event

    log_event(
        "device_kv_budget_auto",
        free_bytes=free,
        total_bytes=total,
        source=source,
        headroom_bytes=headroom,
        device_budget_bytes=budget,
        max_sessions=max_sessions,
        per_session_bytes=per_session,
    )
    return per_session


def normalize_stats(raw: dict) -> dict:
    """Session stats with `kv_bytes` as {tier: bytes}, whichever way the engine spells them."""
    stats = dict(raw)
    if "kv_bytes" not in stats:
        prefix = "kv_resident_bytes_"
        stats["kv_bytes"] = {k[len(prefix) :]: int(v) for k, v in raw.items() if k.startswith(prefix)}
    return stats


def answer_stats(session: Any) -> dict:
    """The engine's stats of the last answer as a flat dict (num_tokens, finish_reason, ...)."""
    raw = getattr(session, "last_answer_stats", None)
    if raw is None:
        return {}
    if dataclasses.is_dataclass(raw):
        raw = dataclasses.asdict(raw)
    stats = dict(raw)
    if "num_tokens" not in stats and "tokens" in stats:
        stats["num_tokens"] = stats.pop("tokens")
    for key in ("question", "text"):
        stats.pop(key, None)
    return stats
