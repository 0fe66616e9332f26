"""Optional Prometheus metrics (sessions, fps, drops, latency histograms, KV bytes per tier).

Enabled with `vrex serve --metrics-port N` when `prometheus_client` is installed; otherwise
every call is a no-op.
"""

from __future__ import annotations

import collections
import time


class NullMetrics:
    enabled = False

    def session_opened(self) -> None: ...
    def session_closed(self) -> None: ...
    def frame(self, accepted: bool, reason: str, ack_latency_ms: float) -> None: ...
    def frame_error(self) -> None: ...
    def answer(self, ttft_ms: float, total_ms: float, num_tokens: int) -> None: ...
    def kv_bytes(self, session_id: str, per_tier: dict) -> None: ...
    def forget(self, session_id: str) -> None: ...
    def energy(self, kind: str, energy_mj: float) -> None: ...
    def power_sampler(self, sampler) -> None: ...


class PrometheusMetrics(NullMetrics):
    enabled = True

    def __init__(self) -> None:
        import prometheus_client as pc

        self.registry = pc.CollectorRegistry()
        r = self.registry
        self._sessions = pc.Gauge("vrex_sessions_live", "Live sessions", registry=r)
        self._frames = pc.Counter("vrex_frames_total", "Frames by outcome", ["outcome"], registry=r)
        self._frame_errors = pc.Counter("vrex_frame_errors_total", "Frames rejected as invalid", registry=r)
        self._ack = pc.Histogram(
            "vrex_frame_ack_latency_seconds",
            "Receive-to-ack time of a frame",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self._ttft = pc.Histogram(
            "vrex_answer_first_token_seconds", "Time to the first answer token", registry=r
        )
        self._answer = pc.Histogram("vrex_answer_seconds", "Whole answer time", registry=r)
        self._tokens = pc.Counter("vrex_answer_tokens_total", "Answer tokens generated", registry=r)
        self._kv = pc.Gauge("vrex_kv_bytes", "KV-cache bytes per tier, all sessions", ["tier"], registry=r)
        self._accepted_ts: list[float] = []
        self._fps = pc.Gauge(
            "vrex_frames_accepted_per_second", "Accepted frames/s over the last 10 s", registry=r
        )
        self._fps.set_function(self._fps_now)
        self._kv_by_session: dict[str, dict] = {}
        # Measured energy (vrex.power sampler): energy per frame = rate(mJ total) / rate(events).
        self._energy = pc.Counter(
            "vrex_energy_millijoules", "Module energy charged to frames and answers", ["kind"], registry=r
        )
        self._energy_events = pc.Counter(
            "vrex_energy_measured_events", "Frames and answers with measured energy", ["kind"], registry=r
        )
        self._recent_frame_mj: collections.deque[float] = collections.deque(maxlen=100)
        self._energy_per_frame = pc.Gauge(
            "vrex_energy_per_frame_mj", "Mean energy of the last 100 measured frames (mJ)", registry=r
        )
        self._energy_per_frame.set_function(
            lambda: sum(self._recent_frame_mj) / len(self._recent_frame_mj) if self._recent_frame_mj else 0.0
        )
        self._power_present = pc.Gauge(
            "vrex_power_sampler_present", "1 when a power sampler (tegrastats/jtop) runs, else 0", registry=r
        )
        self._power = pc.Gauge("vrex_power_average_mw", "Module power over the last 10 s (mW)", registry=r)
        self._sampler = None
        self._power.set_function(self._power_now)

    def _fps_now(self) -> float:
        cutoff = time.monotonic() - 10.0
        self._accepted_ts = [t for t in self._accepted_ts if t >= cutoff]
        return len(self._accepted_ts) / 10.0

    def start_http(self, host: str, port: int) -> None:
        import prometheus_client as pc

        pc.start_http_server(port, addr=host, registry=self.registry)

    def session_opened(self) -> None:
        self._sessions.inc()

    def session_closed(self) -> None:
        self._sessions.dec()

    def frame(self, accepted: bool, reason: str, ack_latency_ms: float) -> None:
        self._frames.labels("accepted" if accepted else f"dropped_{reason or 'unknown'}").inc()
        self._ack.observe(ack_latency_ms / 1000)
        if accepted:
            self._accepted_ts.append(time.monotonic())
            if len(self._accepted_ts) > 100_000:  # bounded even under a flood
                self._accepted_ts = self._accepted_ts[-50_000:]

    def frame_error(self) -> None:
        self._frame_errors.inc()

    def answer(self, ttft_ms: float, total_ms: float, num_tokens: int) -> None:
        self._ttft.observe(ttft_ms / 1000)
        self._answer.observe(total_ms / 1000)
        self._tokens.inc(num_tokens)

    def kv_bytes(self, session_id: str, per_tier: dict) -> None:
        self._kv_by_session[session_id] = dict(per_tier)
        self._publish_kv()

    def forget(self, session_id: str) -> None:
        self._kv_by_session.pop(session_id, None)
        self._publish_kv()

    def energy(self, kind: str, energy_mj: float) -> None:
        self._energy.labels(kind).inc(energy_mj)
        self._energy_events.labels(kind).inc()
        if kind == "frame":
            self._recent_frame_mj.append(energy_mj)

    def power_sampler(self, sampler) -> None:
        self._sampler = sampler
        self._power_present.set(1 if sampler is not None else 0)

    def _power_now(self) -> float:
        sampler = self._sampler
        if sampler is None:
            return 0.0
        samples = sampler.samples()
        if len(samples) < 2:
            return 0.0
        now = sampler.clock()
        return sampler.average_power_mw(max(now - 10.0, samples[0].t_s), now) or 0.0

    def _publish_kv(self) -> None:
        totals: dict[str, int] = {}
        for per_tier in self._kv_by_session.values():
            for tier, nbytes in per_tier.items():
                totals[tier] = totals.get(tier, 0) + int(nbytes)
        for tier, nbytes in totals.items():
            self._kv.labels(tier).set(nbytes)


def make_metrics(enabled: bool) -> NullMetrics:
    if not enabled:
        return NullMetrics()
    try:
        return PrometheusMetrics()
    except ImportError as exc:
        raise ValueError(
            "--metrics-port needs the prometheus_client package: pip install 'vrex[server]'"
        ) from exc
