"""The engine: one loaded model shared by many sessions, stepped on one model thread."""

from __future__ import annotations

import asyncio
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from vrex.models import load_model
from vrex.models.demo import DEMO_NOTICE, ensure_demo_model, is_demo_model

from .config import EngineConfig, SessionSettings
from .session import Session

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CapacityError(RuntimeError):
    """No room for another session (max_sessions reached)."""


class Engine:
    def __init__(self, config: EngineConfig | None = None, *, adapter=None):
        self.config = config or EngineConfig()
        if adapter is None:
            model_dir = Path(self.config.model_dir) if self.config.model_dir else ensure_demo_model()
            adapter = load_model(model_dir, device=self.config.device, dtype=_DTYPES[self.config.dtype])
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
            sorted(p.name for p in root.iterdir() if (p / "session.json").exists()) if root.exists() else []
        )

    def resume(self, session_id: str) -> Session:
        """An open session by id, or one restored from its snapshot; KeyError when neither exists."""
        if session_id in self.sessions:
            return self.sessions[session_id]
        if not self.config.data_dir or not (self.snapshot_dir(session_id) / "session.json").exists():
            raise KeyError(f"no session {session_id!r} is open or saved")
        if len(self.sessions) >= self.config.max_sessions:
            raise CapacityError(f"the limit of {self.config.max_sessions} sessions is reached")
        session = Session.restore(self, self.snapshot_dir(session_id))
        self.sessions[session.id] = session
        return session

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
