"""The engine: one loaded model shared by many sessions, stepped on one model thread."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vrex.kv.snapshot import SnapshotError, resolve_snapshot_folder
from vrex.kv.store import step_bytes_bound
from vrex.memory import check_device, choose_dtype, default_host_kv_budget
from vrex.models import load_model
from vrex.models.demo import DEMO_NOTICE, ensure_demo_model, is_demo_model
from vrex.resv import selector_class

from .batching import forward_batch
from .config import EngineConfig, SessionSettings
from .session import FrameResult, PendingFrame, Session


class CapacityError(RuntimeError):
    """No room for another session (max_sessions reached)."""


@dataclass
class _FrameJob:
    session: Session
    image: np.ndarray
    timestamp_s: float
    future: Future


class Engine:
    """One model shared by sessions. Steps run on one model thread; frames that several sessions
    submit at once are prefilled together, one forward with a row per session
    (:func:`~vrex.engine.batching.forward_batch`), when their token counts match."""

    def __init__(self, config: EngineConfig | None = None, *, adapter=None):
        self.config = config or EngineConfig()
        host = default_host_kv_budget(self.config.device, self.config.host_kv_budget_bytes)
        if host != self.config.host_kv_budget_bytes:  # unified memory: no host tier
            self.config = dataclasses.replace(self.config, host_kv_budget_bytes=host)
        if adapter is None:
            model_dir = Path(self.config.model_dir) if self.config.model_dir else ensure_demo_model()
            check_device(self.config.device)
            dtype = choose_dtype(self.config.device, self.config.dtype)
            adapter = load_model(model_dir, device=self.config.device, dtype=dtype)
        self.adapter = adapter
        self.is_demo = is_demo_model(Path(adapter.path))
        try:
            self.frame_tokens = adapter.frame_embeds(np.zeros((64, 64, 3), np.uint8)).num_tokens
            self.accepts_frames = True
        except ValueError:
            self.frame_tokens, self.accepts_frames = 64, False
        self.sessions: dict[str, Session] = {}
        # one model thread: steps of different sessions interleave, never overlap
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="vrex-model")
        # frames waiting for the model thread; each session has at most one in flight
        # (Session.submit_frame drops frames while busy), so this stays near max_sessions jobs
        self._pending: deque[_FrameJob] = deque()
        self._pending_lock = threading.Lock()
        self.batch_counters: Counter = Counter()

    def check_device_budget(self, settings: SessionSettings | None = None) -> None:
        """Refuse a device KV budget no session could work with under ``settings``' policy: one
        below a block per KV head and layer, or one the prompt prefix or a frame may overflow
        (`vrex.kv.store.step_bytes_bound`). A server calls this at start, not at each open."""
        budget = self.config.device_kv_budget_bytes
        if budget is None:
            return
        a, settings = self.adapter, settings or SessionSettings()
        block_tokens = self.config.block_tokens
        block_bytes = block_tokens * 2 * a.head_dim * a.dtype.itemsize
        one_page = selector_class(settings.policy).one_page_per_step
        prefix = a.prompt_prefix(settings.system_prompt) if settings.system_prompt else a.prompt_prefix()
        steps = {f"the prompt prefix ({prefix.num_tokens} tokens)": prefix.num_tokens}
        if self.accepts_frames:
            steps[f"a frame ({self.frame_tokens} tokens)"] = self.frame_tokens
        needs = {"one block per KV head and layer": a.num_layers * a.num_kv_heads * block_bytes}
        for what, tokens in steps.items():
            needs[what] = step_bytes_bound(
                tokens,
                num_kv_heads=a.num_kv_heads,
                block_tokens=block_tokens,
                block_bytes=block_bytes,
                one_page_per_step=one_page,
            )
        what, needed = max(needs.items(), key=lambda item: item[1])
        if needed > budget // block_bytes * block_bytes:
            raise ValueError(
                f"--device-kv-budget {budget} bytes is too small for the {settings.policy} policy: {what} "
                f"may need {needed} bytes of the device KV tier at once; raise it to at least {needed} bytes"
            )

    @property
    def model_info(self) -> dict:
        a = self.adapter
        return {
            "name": Path(a.path).name,
            "path": str(a.path),
            "family": a.family,
            "is_demo": self.is_demo,
            "notice": DEMO_NOTICE if self.is_demo else "",
            "num_layers": a.num_layers,
            "num_heads": a.num_heads,
            "num_kv_heads": a.num_kv_heads,
            "head_dim": a.head_dim,
            "visual_tokens_per_frame": self.frame_tokens,
            "accepts_frames": self.accepts_frames,
            "device": str(a.device),
            "dtype": str(a.dtype).replace("torch.", ""),
        }

    async def run(self, fn, *args):
        """Run ``fn(*args)`` on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- frames of many sessions --------------------------------------------------------------
    async def submit_frame(self, session: Session, image: np.ndarray, timestamp_s: float) -> FrameResult:
        """``session.add_frame(image, timestamp_s)`` on the model thread, batched with the frames
        other sessions submitted meanwhile. Use ``Session.submit_frame``, which keeps one frame
        per session in flight."""
        job = _FrameJob(session, image, timestamp_s, Future())
        with self._pending_lock:
            # closed sessions' last frames may still wait, hence the slack over max_sessions
            if len(self._pending) >= 2 * self.config.max_sessions:
                raise RuntimeError(
                    f"{len(self._pending)} frames are already waiting (one per session is the most "
                    "expected): submit through Session.submit_frame"
                )
            self._pending.append(job)
        # every submitter queues one drain; the first to run takes every frame pending by then
        await self.run(self._drain_frames)
        return await asyncio.wrap_future(job.future)

    def _take_pending(self) -> list[_FrameJob]:
        with self._pending_lock:
            jobs = list(self._pending)
            self._pending.clear()
        return jobs

    def _drain_frames(self) -> None:
        """Model thread: encode every pending frame (taking frames that arrive meanwhile too),
        then prefill them, one forward per group of equal token counts."""
        ready: list[tuple[_FrameJob, PendingFrame]] = []
        while len(ready) < self.config.max_batch_rows and (jobs := self._take_pending()):
            for job in jobs:
                try:
                    prepared = job.session.prepare_frame(job.image, job.timestamp_s)
                except Exception as err:  # noqa: BLE001 - a bad frame fails its own request only
                    job.future.set_exception(err)
                    continue
                if isinstance(prepared, FrameResult):
                    job.future.set_result(prepared)
                else:
                    ready.append((job, prepared))
        groups: dict[int, list[tuple[_FrameJob, PendingFrame]]] = {}
        for item in ready:
            groups.setdefault(item[1].step.num_tokens, []).append(item)
        rows = self.config.max_batch_rows if self.config.batch_frames else 1
        for group in groups.values():
            # one row per session in a forward: a session's second frame extends its first
            batch: list[tuple[_FrameJob, PendingFrame]] = []
            for item in group:
                if len(batch) == rows or any(item[0].session is other.session for other, _ in batch):
                    self._prefill_frames(batch)
                    batch = []
                batch.append(item)
            if batch:
                self._prefill_frames(batch)

    def _prefill_frames(self, group: list[tuple[_FrameJob, PendingFrame]]) -> None:
        if len(group) > 1:  # a step one session refuses (its budget, broken) fails that frame alone
            group = [item for item in group if self._admit(*item)]
        if not group:
            return
        self.batch_counters["forwards"] += 1
        self.batch_counters["frame_rows"] += len(group)
        if len(group) == 1:
            job, pending = group[0]
            try:
                _, rec, step_ms = job.session._step(pending.step, "frame")
                job.future.set_result(job.session.finish_frame(pending, rec, step_ms))
            except Exception as err:  # noqa: BLE001 - reported to the submitter
                job.future.set_exception(err)
            return
        sessions = [job.session for job, _ in group]
        steps = [pending.step for _, pending in group]
        marks = [s.cache_mark() for s in sessions]
        t0 = time.perf_counter()
        try:
            forward_batch(self.adapter, steps, [s.cache for s in sessions], last_logits_only=True)
        except Exception as err:  # noqa: BLE001 - reported to every submitter of the batch
            for (job, _), session, mark in zip(group, sessions, marks, strict=True):
                job.future.set_exception(session.step_failed(mark, err) or err)
            return
        stored = []
        for (job, pending), session, mark in zip(group, sessions, marks, strict=True):
            try:
                stored.append((job, pending, session.policy.end_step()))
            except Exception as err:  # noqa: BLE001 - this session's store failed, not the others'
                job.future.set_exception(session.step_failed(mark, err) or err)
        total_ms = (time.perf_counter() - t0) * 1e3
        if not stored:
            return
        self.batch_counters["batched_forwards"] += 1
        self.batch_counters["batched_rows"] += len(group)
        self.batch_counters["max_batch_rows"] = max(self.batch_counters["max_batch_rows"], len(group))
        retrieval_ms = sum(r.select_ms + r.fetch_ms + r.attention_ms + r.store_ms for _, _, r in stored)
        shared_ms = max(0.0, total_ms - retrieval_ms)
        for job, pending, rec in stored:
            session = job.session
            session._record_step(
                pending.step, "frame", rec, total_ms, batch_rows=len(group), shared_ms=shared_ms
            )
            job.future.set_result(session.finish_frame(pending, rec, total_ms))

    @staticmethod
    def _admit(job: _FrameJob, pending: PendingFrame) -> bool:
        try:
            job.session.begin_step(pending.step, "frame")
        except Exception as err:  # noqa: BLE001 - reported to the submitter
            job.future.set_exception(err)
            return False
        return True

    def stats(self) -> dict:
        """Model-thread counters: ``forwards`` (frame prefill forwards), ``frame_rows`` (frames
        they carried), ``batched_forwards`` / ``batched_rows`` (those with more than one
        session), ``max_batch_rows``."""
        keys = ("forwards", "frame_rows", "batched_forwards", "batched_rows", "max_batch_rows")
        return {k: int(self.batch_counters[k]) for k in keys}

    def open_session(
        self,
        settings: SessionSettings | None = None,
        *,
        session_id: str | None = None,
        trace_path: str | None = None,
    ) -> Session:
        if len(self.sessions) >= self.config.max_sessions:
            raise CapacityError(
                f"{len(self.sessions)} sessions are open, the limit is {self.config.max_sessions}: "
                "close one or raise --max-sessions"
            )
        session = Session(self, settings or SessionSettings(), session_id, trace_path=trace_path)
        self.sessions[session.id] = session
        return session

    def snapshot_dir(self, session_id: str) -> Path:
        if not self.config.data_dir:
            raise ValueError("no data_dir configured")
        return Path(self.config.data_dir) / "sessions" / session_id

    def list_snapshots(self) -> list[str]:
        if not self.config.data_dir:
            return []
        root = Path(self.config.data_dir) / "sessions"
        return (
            sorted(
                p.name
                for p in root.iterdir()
                if not p.name.startswith(".") and (p / "session.json").exists()  # not temp or set aside
            )
            if root.exists()
            else []
        )

    def resume(self, session_id: str) -> Session:
        """An open session by id, or one restored from its snapshot; KeyError when neither exists."""
        if session_id in self.sessions:
            return self.sessions[session_id]
        folder = self._saved_folder(session_id)
        if folder is None:
            raise KeyError(f"no session {session_id!r} is open or saved")
        if len(self.sessions) >= self.config.max_sessions:
            raise CapacityError(f"the limit of {self.config.max_sessions} sessions is reached")
        session = Session.restore(self, folder)
        self.sessions[session.id] = session
        return session

    def _saved_folder(self, session_id: str) -> Path | None:
        """The session's snapshot folder, or the copy a crash between a snapshot's two renames
        set aside (`resolve_snapshot_folder`); None when there is neither.

        Raises:
            SnapshotError: the folder is there without its session.json (damage, not absence)."""
        if not self.config.data_dir:
            return None
        try:
            folder = resolve_snapshot_folder(self.snapshot_dir(session_id))
        except SnapshotError:
            return None
        if not (folder / "session.json").exists():
            raise SnapshotError(f"{folder}: session.json is missing, the snapshot is incomplete")
        return folder

    def close_session(self, session_id: str, *, forget: bool = False) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            session.close()
        if forget and self.config.data_dir:
            shutil.rmtree(self.snapshot_dir(session_id), ignore_errors=True)

    def shutdown(self) -> None:
        for sid in list(self.sessions):
            self.close_session(sid)
        self._executor.shutdown(wait=True)
