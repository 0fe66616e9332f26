"""Fixtures of the engine tests."""

from __future__ import annotations

import asyncio
import threading

import pytest


def _submit_together(sessions, frames, t, *, return_exceptions=False):
    """Submit one frame per session while the model thread is held, so all are pending at once
    (one batched prefill); the results, in order (errors too, with ``return_exceptions``)."""
    engine = sessions[0].engine

    async def go():
        gate = threading.Event()
        held = asyncio.ensure_future(engine.run(gate.wait))
        tasks = [asyncio.ensure_future(s.submit_frame(f, t)) for s, f in zip(sessions, frames, strict=True)]
        while len(engine._pending) < len(tasks):
            await asyncio.sleep(0.001)
        gate.set()
        await held
        return await asyncio.gather(*tasks, return_exceptions=return_exceptions)

    return asyncio.run(go())


@pytest.fixture
def submit_together():
    """``submit_together(sessions, frames, t, return_exceptions=False)``: see `_submit_together`."""
    return _submit_together
