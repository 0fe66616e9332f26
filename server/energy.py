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

from vrex.power import NO_SAMPLER_NOTE, PowerSampler, SessionEnergy

__all__ = ["SessionEnergy", "start_sampler"]


def start_sampler(interval_ms: int = 100) -> PowerSampler | None:
    """The machine's power sampler, started; None where there is none (or it cannot start)."""
    from server.logs import log_event
    from vrex.power import start_detected_sampler

    sampler, why_not = start_detected_sampler(interval_ms)
    if sampler is None:
        log_event("power_sampler", 20 if why_not == NO_SAMPLER_NOTE else 30, source=None, note=why_not)
        return None
    log_event("power_sampler", source=sampler.source, interval_ms=interval_ms)
    return sampler
