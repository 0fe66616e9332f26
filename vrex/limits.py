"""Names and bounds of session settings, torch-free: the server and the command lines check
them before (or without) importing the engine, which loads torch."""

import math

POLICIES = ("full", "window", "topk", "rekv", "resv")  # KV selection policies a session can use
RESV_PRESETS = ("default", "paper")  # vrex.resv.PRESETS (a test checks they match)
MAX_FPS = 120.0  # frames per second a session keeps at most
MAX_NEW_TOKENS = 4096  # longest answer a session may ask for
MAX_FRAME_PIXELS = 3840 * 2160  # the server's default frame limit (4K)
MAX_TEMPERATURE = 5.0  # sampling temperature a session or question may ask for (0 = greedy)


def check_fps(flag: str, fps: float) -> None:
    """A ValueError naming `flag` unless `fps` is in (0, MAX_FPS]."""
    if not math.isfinite(fps) or not 0 < fps <= MAX_FPS:
        raise ValueError(f"{flag} must be in (0, {MAX_FPS:g}] frames per second, got {fps:g}")


def check_max_new_tokens(flag: str, tokens: int) -> None:
    """A ValueError naming `flag` unless `tokens` is in 1..MAX_NEW_TOKENS."""
    if not 1 <= tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"{flag} must be in 1..{MAX_NEW_TOKENS}, got {tokens}")


def sampling_error(temperature: float, top_p: float) -> str | None:
    """What is wrong with a temperature / top_p pair (field names bare), or None."""
    if not (math.isfinite(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
        return f"temperature must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {temperature:g}"
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        return f"top_p must be in (0, 1], got {top_p:g}"
    return None


def check_seconds(flag: str, seconds: float | None) -> None:
    """A ValueError naming `flag` unless `seconds` is a positive finite duration (None: not given)."""
    if seconds is not None and (not math.isfinite(seconds) or seconds <= 0):
        raise ValueError(f"{flag} must be a positive number of seconds, got {seconds:g}")


def check_questions(questions: list[str]) -> None:
    """A ValueError when an --ask question is empty or only whitespace."""
    if any(not q.strip() for q in questions):
        raise ValueError("an --ask question is empty; pass the question text, e.g. --ask 'What happens?'")


def add_preset_flag(parser, *names: str, help: str = "ReSV preset (default: default)") -> None:
    """The ReSV preset flag under both spellings, `names` first (the first gives the dest)."""
    parser.add_argument(*names, default="default", choices=RESV_PRESETS, help=help)
