"""TEST DOUBLE of `vrex.engine` for the server tests. Never used by `vrex serve`.

It implements the engine API the server is written against (Engine, EngineConfig,
SessionSettings, CapacityError, Session.submit_frame/ask/stats/snapshot/close,
Engine.resume/list_snapshots) with a tiny deterministic "model": each accepted frame adds
`visual_tokens_per_frame` tokens, an answer names how many frames it has seen and the mean
colour of the last frame. Engine cost is simulated with asyncio.sleep:
VREX_FAKE_FRAME_MS (default 2) per frame, VREX_FAKE_TOKEN_MS (default 1) per token.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vrex.video import fps_slot


class CapacityError(RuntimeError):
    """Too many sessions, or the KV budget is spent."""


class SnapshotError(ValueError):
    """A snapshot on disk is unreadable (vrex.engine's name for it)."""


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path | str | None = None
    device: str = "cpu"
    dtype: str = "auto"  # accepted and kept (the double has no weights)
    device_kv_budget_bytes: int | None = None
    host_kv_budget_bytes: int | None = None  # accepted and kept (the double has one tier)
    data_dir: Path | str | None = None
    trace_dir: str | None = None  # accepted and kept (the double writes no traces)
    max_sessions: int = 8


@dataclass(frozen=True)
class SessionSettings:
    fps: float = 2.0
    policy: str = "resv"
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    resv_preset: str = "default"

    def __post_init__(self) -> None:
        if self.resv_preset not in ("default", "paper"):
            raise ValueError(f"unknown ReSV preset {self.resv_preset!r}; choose one of ['default', 'paper']")
        if not 0 < self.fps <= 120:  # vrex.engine.SessionSettings' bound
            raise ValueError(f"fps must be in (0, 120], got {self.fps}")
        if self.policy not in ("resv", "full", "window", "topk", "rekv"):
            raise ValueError(f"policy must be one of resv/full/window/topk/rekv, got {self.policy!r}")


@dataclass(frozen=True)
class FrameResult:
    accepted: bool
    dropped_reason: str | None
    history_tokens: int
    fetched_fraction: float
    latency_ms: float
    frame_index: int


@dataclass(frozen=True)
class Delta:
    text: str
    token_id: int


TOKENS_PER_FRAME = 16
KV_BYTES_PER_TOKEN = 1024


@dataclass
class _State:
    settings: dict
    frames_accepted: int = 0
    frames_dropped: int = 0
    history_tokens: int = 0
    last_timestamp_s: float | None = None
    last_mean_rgb: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    questions: int = 0
    frame_index: int = 0  # like the engine: every frame it takes gets one, kept or dropped


class Session:
    def __init__(self, engine: Engine, session_id: str, state: _State):
        self._engine = engine
        self.id = session_id
        self._state = state
        self.settings = SessionSettings(**{**state.settings, "stop": tuple(state.settings.get("stop", ()))})
        self.last_answer_stats: dict = {}
        self._closed = False

    @property
    def frame_index(self) -> int:
        """The index the next frame gets, as vrex.engine's Session.frame_index."""
        return self._state.frame_index

    async def submit_frame(self, image: np.ndarray, timestamp_s: float) -> FrameResult:
        if self._closed:
            raise RuntimeError("session is closed")
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, image.shape
        s = self._state
        index = s.frame_index
        s.frame_index += 1
        if s.last_timestamp_s is not None and fps_slot(timestamp_s, self.settings.fps) <= fps_slot(
            s.last_timestamp_s, self.settings.fps
        ):
            s.frames_dropped += 1
            # the engine's own words: the server must not rely on a fixed reason string
            return FrameResult(False, "above the session's target fps", s.history_tokens, 0.0, 0.0, index)
        await asyncio.sleep(float(os.environ.get("VREX_FAKE_FRAME_MS", "2")) / 1000)
        s.last_timestamp_s = timestamp_s
        s.last_mean_rgb = [float(c) for c in image.reshape(-1, 3).mean(axis=0)]
        fetched = 0.0 if s.history_tokens == 0 else min(1.0, 64 / s.history_tokens)
        s.history_tokens += TOKENS_PER_FRAME
        s.frames_accepted += 1
        return FrameResult(True, None, s.history_tokens, fetched, 1.0, index)

    async def ask(self, question: str, max_new_tokens=None, temperature=None, top_p=None, stop=None):
        s = self._state
        limit = max_new_tokens or self.settings.max_new_tokens
        r, g, b = (round(c) for c in s.last_mean_rgb)
        text = f"I have seen {s.frames_accepted} frames; the last one averages rgb({r},{g},{b})."
        words = text.split(" ")
        token_s = float(os.environ.get("VREX_FAKE_TOKEN_MS", "1")) / 1000
        emitted = 0
        for i, word in enumerate(words[:limit]):
            await asyncio.sleep(token_s)
            emitted += 1
            yield Delta(text=word if i == 0 else " " + word, token_id=1000 + i)
            if "FAIL_MIDWAY" in question and emitted == 2:
                # like vrex.engine: the turn is closed with what was generated, then the error
                self._close_turn(question, emitted, "error")
                raise RuntimeError("the model failed mid-answer")
        self._close_turn(question, emitted, "length" if emitted < len(words) else "stop")

    def _close_turn(self, question: str, emitted: int, finish_reason: str) -> None:
        s = self._state
        s.questions += 1
        s.history_tokens += len(question.split()) + emitted
        self.last_answer_stats = {
            "num_tokens": emitted,
            "finish_reason": finish_reason,
            "fetched_fraction_text": 0.25,
            "history_token_ids": [1000 + i for i in range(emitted)],
        }

    # write-ahead log replay: the same effects as submit_frame / ask, idempotent by index
    def replay_frame(self, image: np.ndarray, timestamp_s: float, frame_index: int) -> bool:
        s = self._state
        if frame_index < s.frame_index:
            return False
        s.frame_index = frame_index + 1
        if s.last_timestamp_s is not None and fps_slot(timestamp_s, self.settings.fps) <= fps_slot(
            s.last_timestamp_s, self.settings.fps
        ):
            raise ValueError(f"logged frame {frame_index} would be dropped by the sampler on replay")
        s.last_timestamp_s = timestamp_s
        s.last_mean_rgb = [float(c) for c in image.reshape(-1, 3).mean(axis=0)]
        s.history_tokens += TOKENS_PER_FRAME
        s.frames_accepted += 1
        return True

    def replay_answer(self, question: str, token_ids: list[int], answer_index: int) -> bool:
        s = self._state
        if answer_index < s.questions:
            return False
        s.questions += 1
        s.history_tokens += len(question.split()) + len(token_ids)
        return True

    def stats(self) -> dict:
        s = self._state
        return {
            "frames_accepted": s.frames_accepted,
            "frames_dropped": s.frames_dropped,
            "history_tokens": s.history_tokens,
            "last_frame_ts": s.last_timestamp_s,
            "fetched_fraction_frame": 0.5,
            "fetched_fraction_text": 0.25,
            "kv_bytes": {"device": s.history_tokens * KV_BYTES_PER_TOKEN, "host": 0, "disk": 0},
            "questions": s.questions,
            "answers": s.questions,
        }

    def snapshot(self) -> None:
        data_dir = self._engine.config.data_dir
        if data_dir is None:
            return
        folder = Path(data_dir) / self.id
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "state.json.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self._state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / "state.json")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine._live.pop(self.id, None)


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self._live: dict[str, Session] = {}
        self.model_info = {
            "name": "fake-test-engine",
            "is_demo": True,
            "notice": "TEST DOUBLE: answers are synthetic, not from a model",
            "num_layers": 2,
            "visual_tokens_per_frame": TOKENS_PER_FRAME,
        }

    def _check_capacity(self) -> None:
        if len(self._live) >= self.config.max_sessions:
            raise CapacityError(f"{len(self._live)} of {self.config.max_sessions} sessions in use")

    def open_session(self, settings: SessionSettings) -> Session:
        self._check_capacity()
        session = Session(self, uuid.uuid4().hex[:16], _State(settings=asdict(settings)))
        self._live[session.id] = session
        return session

    def resume(self, session_id: str) -> Session:
        if session_id in self._live:
            return self._live[session_id]
        if self.config.data_dir is None or not session_id.isalnum():
            raise KeyError(session_id)
        path = Path(self.config.data_dir) / session_id / "state.json"
        if not path.exists():
            raise KeyError(session_id)
        self._check_capacity()
        try:
            state = _State(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise SnapshotError(f"snapshot {path} is corrupted ({exc})") from None
        session = Session(self, session_id, state)
        self._live[session_id] = session
        return session

    def list_snapshots(self) -> list[str]:
        if self.config.data_dir is None or not Path(self.config.data_dir).exists():
            return []
        return sorted(p.parent.name for p in Path(self.config.data_dir).glob("*/state.json"))
