"""Measured energy per frame and per answer, charged from the module power sampler (vrex.power).

The server starts `vrex.power.detect_sampler()` (tegrastats or jtop, on a Jetson) with itself.
Each session keeps a `SessionEnergy`: every accepted frame and every answer is a `PowerEvent`
on the sampler's clock, settled once a power sample after its end has arrived, so the energy is
integrated over real samples on both sides. Where there is no sampler, the stats say
"no power sampler on this machine" and carry no numbers.

Which time window is charged:
- a frame: the engine's own time for it (FrameResult.latency_ms, ending when it returned), so
  frames of concurrent sessions, which take turns on the one model thread, do not overlap;
- an answer: from the question's start to the last token (wall time). Frames of other sessions
  that interleave with its decode steps are inside that window too, so with several busy
  sessions energy_per_answer_mj counts some of their energy; per-frame numbers are not affected.
The energy is the whole module's (idle CPU/SoC included), the unit the simulator reports.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

from vrex.power import NO_SAMPLER_NOTE, PowerEvent, PowerSampler

# Events whose end no sample has followed within this long are given up (the sampler stalled).
GIVE_UP_S = 10.0


@dataclass
class _Totals:
    energy_mj: float = 0.0
    busy_s: float = 0.0
    num_measured: int = 0
    num_unmeasured: int = 0


class SessionEnergy:
    """Energy charged to one session's frames and answers (bounded: pending events are capped)."""

    def __init__(self, sampler: PowerSampler | None, max_pending: int = 4096):
        self.sampler = sampler
        self._pending: collections.deque[PowerEvent] = collections.deque(maxlen=max_pending)
        self._totals = {"frame": _Totals(), "answer": _Totals()}

    def clock(self) -> float:
        return self.sampler.clock() if self.sampler is not None else time.monotonic()

    def record(self, kind: str, start_s: float, end_s: float) -> None:
        """Charge [start_s, end_s] (sampler clock) to one `kind` ("frame" | "answer") event."""
        if self.sampler is None or end_s < start_s:
            return
        self._pending.append(PowerEvent(kind, start_s, end_s))

    def settle(self) -> list[tuple[str, float]]:
        """Integrate the pending events a later sample now covers; returns (kind, mJ) of each."""
        if self.sampler is None or not self._pending:
            return []
        samples = self.sampler.samples()
        last_s = samples[-1].t_s if samples else None
        now = self.clock()
        ready = []
        while self._pending:
            event = self._pending[0]
            if last_s is not None and event.end_s <= last_s:
                ready.append(self._pending.popleft())
            elif now - event.end_s > GIVE_UP_S:
                self._pending.popleft()
                self._totals[event.kind].num_unmeasured += 1
            else:
                break
        if not ready:
            return []
        report = self.sampler.attribute(ready)
        settled = []
        for event, mj in zip(ready, report.per_event_mj, strict=True):
            totals = self._totals[event.kind]
            if mj is None:  # the ring no longer reaches back to it
                totals.num_unmeasured += 1
                continue
            totals.energy_mj += mj
            totals.busy_s += event.end_s - event.start_s
            totals.num_measured += 1
            settled.append((event.kind, mj))
        return settled

    def stats(self) -> dict:
        """Keys for session stats: power_sampler, power_note, and numbers only when measured."""
        if self.sampler is None:
            return {"power_sampler": None, "power_note": NO_SAMPLER_NOTE}
        self.settle()
        frames, answers = self._totals["frame"], self._totals["answer"]
        note = f"measured with {self.sampler.source}"
        if self.sampler.error:
            note += f" ({self.sampler.error})"
        out: dict = {"power_sampler": self.sampler.source, "power_note": note}
        out["energy_frames_measured"] = frames.num_measured
        out["energy_answers_measured"] = answers.num_measured
        if frames.num_measured:
            out["energy_per_frame_mj"] = frames.energy_mj / frames.num_measured
        if answers.num_measured:
            out["energy_per_answer_mj"] = answers.energy_mj / answers.num_measured
        busy_s = frames.busy_s + answers.busy_s
        if busy_s > 0:
            # module power while this session's frames and answers ran
            out["average_power_mw"] = (frames.energy_mj + answers.energy_mj) / busy_s
        return out


def start_sampler(interval_ms: int = 100) -> PowerSampler | None:
    """The machine's power sampler, started; None where there is none (or it cannot start)."""
    from server.logs import log_event
    from vrex.power import detect_sampler

    sampler = detect_sampler(interval_ms=interval_ms)
    if sampler is None:
        log_event("power_sampler", source=None, note=NO_SAMPLER_NOTE)
        return None
    try:
        sampler.start()
    except (OSError, ValueError) as exc:
        log_event("power_sampler", 30, source=sampler.source, error=str(exc))
        return None
    log_event("power_sampler", source=sampler.source, interval_ms=interval_ms)
    return sampler
