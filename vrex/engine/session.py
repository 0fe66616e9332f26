"""A streaming session: frames in (iterative prefill), questions in, answer tokens out.

The synchronous methods (``add_frame``, ``generate``) do the work; the engine runs them on its
model thread. The ``async`` methods are what servers call.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vrex.kv import StepTooLargeError, TierBudgets, TieredKVStore
from vrex.kv.snapshot import atomic_folder, verify_manifest, write_manifest
from vrex.limits import sampling_error
from vrex.models.adapters import StepInput
from vrex.resv import SelectorConfig, make_selector
from vrex.video import fps_slot

from .config import SessionSettings
from .retrieval import PartialStepError, RetrievalPolicy, StepRecord

if TYPE_CHECKING:
    from .engine import Engine

SNAPSHOT_FORMAT = "vrex.session/1"


@dataclass
class FrameResult:
    accepted: bool
    frame_index: int
    timestamp_s: float
    dropped_reason: str | None = None
    history_tokens: int = 0
    fetched_fraction: float = 0.0
    latency_ms: float = 0.0
    phases_ms: dict = field(default_factory=dict)


@dataclass
class PendingFrame:
    """A kept, encoded frame waiting for its prefill step."""

    index: int
    timestamp_s: float
    step: StepInput
    vision_ms: float


@dataclass
class TokenDelta:
    text: str
    token_id: int
    index: int


class SessionBrokenError(RuntimeError):
    """The session lost a step half-way (`PartialStepError`) and takes no more steps: close it,
    and resume it from its snapshot (and write-ahead log) to go on."""


log = logging.getLogger("vrex.engine")
# temperatures this small sample the argmax anyway; below float32's range they would divide by 0
GREEDY_BELOW = 1e-6


@dataclass
class AnswerStats:
    question: str
    text: str = ""
    tokens: int = 0
    finish_reason: str = ""
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0
    fetched_fraction_text: float = 0.0
    fetched_fraction_decode: float = 0.0
    # the answer tokens fed back into the KV history (a write-ahead log replays exactly these)
    history_token_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.total_ms / 1e3) if self.total_ms else 0.0


def _free_trace_path(folder: Path, session_id: str) -> Path:
    """``<id>.jsonl``, or ``<id>.<n>.jsonl`` for a session restored after its first trace: each
    file is a whole trace with its own header."""
    folder.mkdir(parents=True, exist_ok=True)
    path, n = folder / f"{session_id}.jsonl", 0
    while path.exists():
        n += 1
        path = folder / f"{session_id}.{n}.jsonl"
    return path


class Session:
    def __init__(
        self,
        engine: Engine,
        settings: SessionSettings,
        session_id: str | None = None,
        *,
        trace_path: str | None = None,
        _restoring: bool = False,
    ):
        self.engine = engine
        self.settings = settings
        self.id = session_id or uuid.uuid4().hex[:16]
        self.adapter = engine.adapter
        a = self.adapter
        self.frame_tokens = engine.frame_tokens
        self.recent_tokens = (
            settings.recent_tokens if settings.recent_tokens is not None else self.frame_tokens
        )
        self.counters: Counter = Counter()
        self.drop_reasons: Counter = Counter()
        self.steps: deque[dict] = deque(maxlen=256)
        self.answers: deque[AnswerStats] = deque(maxlen=256)  # the latest; counters count all
        self.last_answer_stats: AnswerStats | None = None
        self.last_frame_ts: float | None = None
        self.frame_index = 0
        self._fetch_tally: dict[
            str, list[np.ndarray]
        ] = {}  # stage -> [selected, history] per layer x KV head
        self._busy = False
        self._closed = False
        # an answer's turn that could not be closed yet (its closing step failed); the next
        # step closes it first, so the history never reads as one unfinished turn
        self._turn_open = False
        self._answering: Iterator | None = None  # the answer `ask` is streaming, if any
        self._broken: str | None = None  # why no step may run any more (SessionBrokenError)
        self.prefix_tokens = 0
        cfg = engine.config
        disk_dir = Path(cfg.data_dir) / "kv-disk" / self.id if cfg.data_dir else None
        self.store = TieredKVStore(
            a.num_layers,
            a.num_kv_heads,
            a.head_dim,
            dtype=a.dtype,
            device=a.device,
            budgets=TierBudgets(cfg.device_kv_budget_bytes, cfg.host_kv_budget_bytes, disk_dir),
            block_tokens=cfg.block_tokens,
        )
        self._trace = None
        if trace_path is None and cfg.trace_dir:
            trace_path = _free_trace_path(Path(cfg.trace_dir), self.id)
        if trace_path:
            from vrex.trace import TraceWriter

            self._trace = TraceWriter(trace_path, self._trace_header())
        if not _restoring:
            prefix = a.prompt_prefix(settings.system_prompt) if settings.system_prompt else a.prompt_prefix()
            self.prefix_tokens = prefix.num_tokens
            self._build_policy()
            self._step(prefix, "text")

    # -- construction ------------------------------------------------------------------------
    def _selector_config(self) -> SelectorConfig:
        s = self.settings
        return SelectorConfig(
            policy=s.policy,
            sink_tokens=self.prefix_tokens,
            recent_tokens=self.recent_tokens,
            resv=s.resv,
            budget_fraction=s.budget_fraction,
        )

    def _build_policy(self) -> None:
        a = self.adapter
        selector = make_selector(
            a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim, self._selector_config(), device=a.device
        )
        self.policy = RetrievalPolicy(selector, self.store)
        self.cache = a.new_cache(self.policy)

    def _trace_header(self) -> dict:
        from vrex.trace import SCHEMA

        a, tc = self.adapter, self.adapter.text_config
        return {
            "kind": "header",
            "schema": SCHEMA,
            "policy": self.settings.policy,
            "model": {
                "num_layers": a.num_layers,
                "num_heads": a.num_heads,
                "num_kv_heads": a.num_kv_heads,
                "head_dim": a.head_dim,
                "hidden_size": a.hidden_size,
                "intermediate_size": int(getattr(tc, "intermediate_size", 0) or 0),
                "vocab_size": int(getattr(tc, "vocab_size", 0) or 0),
            },
            "settings": {**dataclasses.asdict(self.settings), "resv": dataclasses.asdict(self.settings.resv)},
            "kv_dtype_bytes": a.dtype.itemsize,
            "device_kv_budget_bytes": self.engine.config.device_kv_budget_bytes,
            # round-tripped so an exotic config value (an object, a dtype) becomes its string
            "hf_config": json.loads(json.dumps(a.model.config.to_dict(), default=str)),
        }

    # -- one model step ------------------------------------------------------------------------
    def _step(self, step, stage: str, last_only: bool = True) -> tuple[torch.Tensor, StepRecord, float]:
        """One forward of ``step``: all of it, or (on an error) nothing at all."""
        self.begin_step(step, stage)
        mark = self.cache_mark()
        t0 = time.perf_counter()
        try:
            logits = self.adapter.forward(step, self.cache, last_logits_only=last_only)
            rec = self.policy.end_step()
        except BaseException as err:
            broken = self.step_failed(mark, err)
            if broken is not None:
                raise broken from err
            raise
        total_ms = (time.perf_counter() - t0) * 1e3
        self._record_step(step, stage, rec, total_ms)
        return logits, rec, total_ms

    def begin_step(self, step, stage: str) -> None:
        """Refuse a step before it changes anything: the session is broken, or the device budget
        may not hold the step's new keys and values."""
        if self._broken is not None:
            raise SessionBrokenError(self._broken)
        try:
            self.policy.begin_step(stage, step.num_tokens)
        except StepTooLargeError as err:
            budget, n = err.budget_bytes, err.new_tokens
            fits = self.store.max_step_tokens(one_page_per_step=self.policy.selector.one_page_per_step)
            what, hint = {
                "prefix": ("the prompt prefix", ", or a shorter system prompt"),
                "question": ("this question", ", or ask a shorter question"),
            }.get(getattr(step, "kind", ""), (f"this {stage} step", ""))
            raise ValueError(
                f"{what} ({n} tokens) may need {err.needed_bytes} bytes of the device KV tier at "
                f"once, over the session's whole device budget of {budget} bytes (--device-kv-budget); "
                f"steps of up to {fits} tokens fit: raise --device-kv-budget to at least {err.needed_bytes} "
                f"bytes{hint}"
            ) from None

    def cache_mark(self) -> tuple[int, list[int]]:
        """Where the decoder's cache counters stand, to put them back if a step fails."""
        return self.cache.next_position, [layer.num_tokens for layer in self.cache.layers]

    def step_failed(self, mark: tuple[int, list[int]], err: BaseException) -> SessionBrokenError | None:
        """Undo a failed step's trace in the cache counters. The policy stored nothing, unless
        storing itself broke half-way: then the session is broken, and the error to raise instead
        of ``err`` is returned."""
        self.policy.abort_step()
        if isinstance(err, PartialStepError):
            self._broken = (
                f"session {self.id} lost a step half-way and takes no more steps ({err}); close it and "
                "resume it from its snapshot to go on"
            )
            log.error("%s", self._broken)
            return SessionBrokenError(self._broken)
        self.cache.next_position, counts = mark
        for layer, count in zip(self.cache.layers, counts, strict=True):
            layer.num_tokens = count
        return None

    def _record_step(
        self,
        step,
        stage: str,
        rec: StepRecord,
        total_ms: float,
        *,
        batch_rows: int = 1,
        shared_ms: float | None = None,
    ) -> None:
        """Stats and trace of one step. In a batched step (``batch_rows`` > 1) ``total_ms`` is the
        whole forward's wall time and ``shared_ms`` the part of it not spent in any row's retrieval
        (the batched projections and MLP), which is this row's ``mlp_and_rest_ms``."""
        self.counters[f"steps_{stage}"] += 1
        own_ms = rec.select_ms + rec.fetch_ms + rec.attention_ms + rec.store_ms
        summary = {
            "stage": stage,
            "new_tokens": step.num_tokens,
            "history_tokens": rec.history_tokens,
            "fetched_fraction": rec.fetched_fraction(),
            "latency_ms": total_ms,
            "select_ms": rec.select_ms,
            "fetch_ms": rec.fetch_ms,
            "attention_ms": rec.attention_ms,
            "store_ms": rec.store_ms,
            "mlp_and_rest_ms": max(0.0, total_ms - own_ms if shared_ms is None else shared_ms),
            "bytes_device": rec.bytes_device,
            "bytes_host": rec.bytes_host,
            "bytes_disk": rec.bytes_disk,
            "batch_rows": batch_rows,
        }
        self.steps.append(summary)
        for k in ("bytes_device", "bytes_host", "bytes_disk"):
            self.counters[k] += summary[k]
        if rec.layers and rec.history_tokens:
            shape = (self.adapter.num_layers, self.adapter.num_kv_heads)
            acc = self._fetch_tally.setdefault(stage, [np.zeros(shape, np.int64), np.zeros(shape, np.int64)])
            for layer in rec.layers:
                for h in layer["heads"]:
                    acc[0][layer["layer"], h["kv_head"]] += h["selected_tokens"]
                    acc[1][layer["layer"], h["kv_head"]] += h["history_tokens"]
        if self._trace is not None:
            self._trace.write_step(
                {
                    "kind": "step",
                    "step": self._trace.steps,
                    "stage": stage,
                    "new_tokens": step.num_tokens,
                    "history_tokens": rec.history_tokens,
                    "layers": rec.layers,
                    "latency_ms": {
                        k: summary[k] for k in ("latency_ms", "select_ms", "fetch_ms", "attention_ms")
                    },
                }
            )

    @property
    def broken(self) -> str | None:
        """Why the session takes no more steps (it lost one half-way), or None."""
        return self._broken

    @property
    def history_tokens(self) -> int:
        return self.store.length(0)

    # -- frames ---------------------------------------------------------------------------------
    def sample(self, timestamp_s: float) -> str | None:
        """The sampler: a reason to drop a frame at ``timestamp_s``, or None to keep it."""
        if self._closed:
            return "session closed"
        if self.last_frame_ts is not None:
            if timestamp_s < self.last_frame_ts:
                return "timestamp went backwards"
            # one frame per 1/fps slot, as clients sample (vrex.video.FpsSampler): a minimum gap
            # instead would drop a client's pick at 1.0 s after its pick at 0.52 s
            if fps_slot(timestamp_s, self.settings.fps) <= fps_slot(self.last_frame_ts, self.settings.fps):
                return "above the session's target fps"
        return None

    def add_frame(self, image: np.ndarray, timestamp_s: float) -> FrameResult:
        pending = self.prepare_frame(image, timestamp_s)
        if isinstance(pending, FrameResult):
            return pending
        _, rec, step_ms = self._step(pending.step, "frame")
        return self.finish_frame(pending, rec, step_ms)

    def prepare_frame(self, image: np.ndarray, timestamp_s: float) -> FrameResult | PendingFrame:
        """Sample and encode a frame: a dropped :class:`FrameResult`, or the step to prefill."""
        self._close_turn()  # left open by an answer whose closing step failed
        index = self.frame_index
        self.frame_index += 1
        reason = self.sample(timestamp_s)
        if reason is not None:
            return self._dropped(index, timestamp_s, reason)
        t0 = time.perf_counter()
        step = self.adapter.frame_embeds(image)
        return PendingFrame(index, timestamp_s, step, (time.perf_counter() - t0) * 1e3)

    def finish_frame(self, pending: PendingFrame, rec: StepRecord, step_ms: float) -> FrameResult:
        """After the frame's step ran (alone or in a batch): the frame is in the history."""
        self.last_frame_ts = pending.timestamp_s
        self.counters["frames_accepted"] += 1
        phases = {
            "vision_ms": pending.vision_ms,
            **{k: v for k, v in self.steps[-1].items() if k.endswith("_ms")},
        }
        return FrameResult(
            True,
            pending.index,
            pending.timestamp_s,
            None,
            self.history_tokens,
            rec.fetched_fraction(),
            pending.vision_ms + step_ms,
            phases,
        )

    def _dropped(self, index: int, timestamp_s: float, reason: str) -> FrameResult:
        self.counters["frames_dropped"] += 1
        self.drop_reasons[reason] += 1
        return FrameResult(False, index, timestamp_s, reason, self.history_tokens)

    # -- questions --------------------------------------------------------------------------------
    def generate(
        self,
        question: str,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: tuple[str, ...] | None = None,
        seed: int = 0,
    ) -> Iterator[TokenDelta]:
        """Prefill the question, then decode; yields text deltas. Multi-turn: the answer stays in
        the history and the next user turn is opened after it."""
        s = self.settings
        max_new = max_new_tokens or s.max_new_tokens
        temperature = s.temperature if temperature is None else temperature
        top_p = s.top_p if top_p is None else top_p
        stop = tuple(s.stop if stop is None else stop)
        problem = sampling_error(temperature, top_p)
        if problem:
            raise ValueError(problem)
        q_ids = self.adapter.tokenize_user(question)
        if len(q_ids) > self.engine.config.max_question_tokens:
            raise ValueError(
                f"question has {len(q_ids)} tokens; the limit is "
                f"{self.engine.config.max_question_tokens}: shorten it"
            )
        self._close_turn()  # left open by an answer whose closing step failed
        stats = AnswerStats(question=question)
        self.last_answer_stats = stats
        t0 = time.perf_counter()
        logits, rec, _ = self._step(self.adapter.question_input(question), "text")
        stats.fetched_fraction_text = rec.fetched_fraction()
        gen = torch.Generator().manual_seed(seed)
        eos = set(self.adapter.eos_token_ids)
        ids: list[int] = []
        emitted = ""
        decode_fractions = []
        # The question is in the history now: however the answer ends (done, an error, or the
        # caller stops reading), it is counted and its turn closed below, or the next question
        # would continue this half-finished one. What was fed back (history_token_ids) stays.
        finish = "length"
        done = False
        try:
            for i in range(max_new):
                token = _sample(logits[0, -1], temperature, top_p, gen)
                if token in eos:
                    finish = "stop"
                    break
                ids.append(token)
                text = self.adapter.tokenizer.decode(ids, skip_special_tokens=True)
                hit = next((st for st in stop if st and st in text), None)
                if hit is not None:
                    text = text[: text.index(hit)]
                    finish = "stop"
                if not text.endswith("\ufffd") and len(text) > len(emitted):
                    delta, emitted = text[len(emitted) :], text
                    if stats.tokens == 0:
                        stats.time_to_first_token_ms = (time.perf_counter() - t0) * 1e3
                    stats.tokens = len(ids)
                    yield TokenDelta(delta, token, i)
                if hit is not None:
                    break
                if i + 1 < max_new:
                    logits, rec = self._feed_token(token, stats.history_token_ids)
                    decode_fractions.append(rec.fetched_fraction())
            done = True
        except GeneratorExit:
            finish = "cancelled"
            raise
        except BaseException:
            finish = "error"
            raise
        finally:
            stats.tokens = len(ids)
            stats.text = emitted
            stats.finish_reason = finish
            stats.fetched_fraction_decode = float(np.mean(decode_fractions)) if decode_fractions else 0.0
            self.answers.append(stats)
            self.counters["answers"] += 1
            self._turn_open = True
            try:
                self._close_turn()
            except Exception:
                if done:
                    raise
                # an error is already on its way out: it is the one to report; the next step
                # retries the close
                log.warning(
                    "session %s: closing the turn after a %s answer failed", self.id, finish, exc_info=True
                )
            stats.total_ms = (time.perf_counter() - t0) * 1e3

    def _feed_token(self, token: int, fed: list[int]) -> tuple[torch.Tensor, StepRecord]:
        """A decode step of ``token``, recorded in ``fed`` once the KV history holds it (also
        when a later part of the step fails: the log must replay what the cache holds)."""
        before = self.history_tokens
        try:
            logits, rec, _ = self._step(self.adapter.token_input(token), "decode")
        finally:
            if self.history_tokens > before:
                fed.append(token)
        return logits, rec

    def _close_turn(self) -> None:
        """End the last answer's turn and open the next user turn, if not done yet."""
        if self._turn_open:
            self._step(self.adapter.next_turn_input(), "text")
            self._turn_open = False

    # -- replay from a write-ahead log (server/wal.py) ----------------------------------------------
    def replay_frame(self, image: np.ndarray, timestamp_s: float, frame_index: int) -> bool:
        """Prefill again a frame that was accepted as ``frame_index`` before a crash, after
        ``restore``. False when the restored state already holds it (the log may overlap the
        snapshot). Records must be replayed in their original order."""
        if frame_index < self.frame_index:
            return False
        self.frame_index = frame_index  # frames dropped in between are not logged
        result = self.add_frame(image, timestamp_s)
        if not result.accepted:
            raise ValueError(
                f"logged frame {frame_index} at {timestamp_s} s was dropped on replay "
                f"({result.dropped_reason}); the log does not belong to this snapshot"
            )
        return True

    def replay_answer(self, question: str, history_token_ids: list[int], answer_index: int) -> bool:
        """Prefill again the question and answer tokens of answer number ``answer_index`` (the
        same steps ``generate`` ran, without sampling). False when the state already holds it."""
        if answer_index < self.counters["answers"]:
            return False
        self._close_turn()
        self._step(self.adapter.question_input(question), "text")
        for token in history_token_ids:
            self._step(self.adapter.token_input(int(token)), "decode")
        self._step(self.adapter.next_turn_input(), "text")
        self.answers.append(
            AnswerStats(
                question=question, finish_reason="replayed", history_token_ids=list(history_token_ids)
            )
        )
        self.counters["answers"] += 1
        return True

    # -- async API for servers ------------------------------------------------------------------
    async def submit_frame(self, image: np.ndarray, timestamp_s: float) -> FrameResult:
        """Keep or drop a frame; a kept frame is in the history when this returns. A frame that
        arrives while the previous one (or an answer) is still running is dropped: queues stay
        bounded and a session that falls behind real time sheds frames."""
        if self._busy:
            index = self.frame_index
            self.frame_index += 1
            return self._dropped(index, timestamp_s, "behind real time: the previous step is still running")
        self._busy = True
        try:
            # the engine batches this frame's prefill with other sessions' pending frames
            return await self.engine.submit_frame(self, image, timestamp_s)
        finally:
            self._busy = False

    async def ask(self, question: str, **options) -> AsyncIterator[TokenDelta]:
        if self._busy:
            raise RuntimeError("the session is busy with another frame or answer; retry when it is done")
        self._busy = True
        it = self._answering = self.generate(question, **options)
        try:
            while True:
                delta = await self.engine.run(next, it, None)
                if delta is None:
                    break
                yield delta
        finally:
            try:
                # a caller that stops early (a disconnect) still gets the turn closed, on the
                # model thread, after any step in flight there; a failure there is logged by
                # generate and must not replace what is propagating (a cancel above all)
                await self.engine.run(_close_quietly, it, self.id)
            finally:
                self._answering = None
                self._busy = False

    # -- stats ------------------------------------------------------------------------------------
    def stats(self) -> dict:
        frames = [s for s in self.steps if s["stage"] == "frame"]
        decodes = [s for s in self.steps if s["stage"] == "decode"]
        texts = [s for s in self.steps if s["stage"] in ("text", "decode") and s["history_tokens"]]
        kv = self.store.stats()
        out = {
            "session_id": self.id,
            "policy": self.settings.policy,
            "frames_accepted": self.counters["frames_accepted"],
            "frames_dropped": self.counters["frames_dropped"],
            "drop_reasons": dict(self.drop_reasons),
            "answers": self.counters["answers"],
            "history_tokens": self.history_tokens,
            # a resuming client continues its timestamps after this (None before the first frame)
            "last_frame_ts": self.last_frame_ts,
            "fetched_fraction_frame": float(np.mean([s["fetched_fraction"] for s in frames]))
            if frames
            else 0.0,
            "fetched_fraction_decode": float(np.mean([s["fetched_fraction"] for s in decodes]))
            if decodes
            else 0.0,
            # the text stage: question prefill and answer decoding (steps with a history)
            "fetched_fraction_text": float(np.mean([s["fetched_fraction"] for s in texts])) if texts else 0.0,
            "bytes_fetched_device": self.counters["bytes_device"],
            "bytes_fetched_host": self.counters["bytes_host"],
            "bytes_fetched_disk": self.counters["bytes_disk"],
            "last_step": dict(self.steps[-1]) if self.steps else {},
        }
        # the paper's Fig. 20 view: share of the history fetched per layer and KV head, per stage
        out["fetched_fraction_per_layer_head"] = {
            stage: np.round(sel / np.maximum(hist, 1), 4).tolist()
            for stage, (sel, hist) in self._fetch_tally.items()
        }
        if self.adapter.device.type == "cuda":
            out["device_memory_allocated_bytes"] = int(torch.cuda.memory_allocated(self.adapter.device))
        for tier in ("device", "host", "disk"):
            out[f"kv_resident_bytes_{tier}"] = kv.get(f"resident_bytes_{tier}", 0)
            # (token, KV head, layer) entries: the store keeps each head's KV apart
            out[f"kv_resident_tokens_{tier}"] = kv.get(f"resident_tokens_{tier}", 0)
        if frames:
            for phase in ("latency_ms", "select_ms", "fetch_ms", "attention_ms", "mlp_and_rest_ms"):
                out[f"frame_{phase}_mean"] = float(np.mean([s[phase] for s in frames]))
        return out

    # -- persistence --------------------------------------------------------------------------------
    def snapshot(self, folder: str | Path | None = None) -> Path:
        """Write the whole session (KV store, HC tables, positions, settings) atomically.

        Run on the model thread (as servers do). An answer still open here was cut off (its
        stream is gone, or the server is stopping): its turn is closed first, so the snapshot
        never holds half a turn."""
        if self._broken is not None:  # the last good snapshot stays as it is
            raise SessionBrokenError(self._broken)
        if self._answering is not None:
            _close_quietly(self._answering, self.id)
        self._close_turn()
        if folder is None:
            if not self.engine.config.data_dir:
                raise ValueError("no data_dir configured: give a folder to snapshot into")
            folder = Path(self.engine.config.data_dir) / "sessions" / self.id
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(folder) as tmp:
            (tmp / "kv").mkdir()
            self.store.write_snapshot_files(tmp / "kv")
            state = {
                "id": self.id,
                "settings": dataclasses.asdict(self.settings),
                "next_position": self.cache.next_position,
                "prefix_tokens": self.prefix_tokens,
                "recent_tokens": self.recent_tokens,
                "frame_index": self.frame_index,
                "last_frame_ts": self.last_frame_ts,
                "turn_open": self._turn_open,
                "counters": dict(self.counters),
                "drop_reasons": dict(self.drop_reasons),
            }
            (tmp / "session.json").write_text(json.dumps(state))
            torch.save(self.policy.selector.state_dict(), tmp / "selector.pt")
            write_manifest(tmp, SNAPSHOT_FORMAT)
        return folder

    @classmethod
    @torch.inference_mode()
    def restore(cls, engine: Engine, folder: str | Path) -> Session:
        folder = Path(folder)
        verify_manifest(folder, SNAPSHOT_FORMAT)
        state = json.loads((folder / "session.json").read_text())
        settings = SessionSettings(**{**state["settings"], "stop": tuple(state["settings"]["stop"])})
        self = cls(engine, settings, state["id"], _restoring=True)
        self.store.close()
        cfg = engine.config
        disk_dir = (
            Path(cfg.data_dir) / "kv-disk" / f"{self.id}-{uuid.uuid4().hex[:6]}" if cfg.data_dir else None
        )
        # under the budgets of the engine it comes back to, not of the one that saved it
        self.store = TieredKVStore.read_snapshot_files(
            folder / "kv",
            device=self.adapter.device,
            disk_dir=disk_dir,
            budgets=TierBudgets(cfg.device_kv_budget_bytes, cfg.host_kv_budget_bytes, disk_dir),
        )
        self.prefix_tokens = state["prefix_tokens"]
        self.recent_tokens = state["recent_tokens"]
        self._build_policy()
        self.policy.selector.load_state_dict(torch.load(folder / "selector.pt", weights_only=True))
        self.cache.next_position = state["next_position"]
        self.frame_index = state["frame_index"]
        self.last_frame_ts = state["last_frame_ts"]
        self._turn_open = bool(state.get("turn_open", False))
        self.counters.update(state["counters"])
        self.drop_reasons.update(state["drop_reasons"])
        return self

    def close(self) -> None:
        self._closed = True
        if self._trace is not None:
            self._trace.close()
        self.store.close()
        disk_dir = self.store.budgets.disk_dir
        if disk_dir is not None:  # the store removed its files; the session's folder goes too
            try:
                Path(disk_dir).rmdir()
            except OSError:  # never made, or not empty (not ours to empty)
                pass


def _close_quietly(answer: Iterator, session_id: str) -> None:
    try:
        answer.close()
    except Exception:
        log.warning("session %s: closing a cut-off answer failed", session_id, exc_info=True)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature < GREEDY_BELOW:
        return int(logits.argmax())
    # shifted first: a tiny temperature then sends the others to -inf, not inf - inf = nan
    logits = logits.float()
    probs = torch.softmax((logits - logits.max()) / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
