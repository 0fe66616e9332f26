"""Decode and validate one frame message into an RGB array; errors say what to fix."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image

from server.config import Limits

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP")


class FrameError(ValueError):
    """The frame cannot be used; the message tells the client what to change."""


def decode_frame(frame, limits: Limits) -> np.ndarray:
    """Turn a `vrex.v1.Frame` into an HxWx3 uint8 array.

    Raises:
        FrameError: missing, oversize, too many pixels, unsupported or corrupt image.
    """
    kind = frame.WhichOneof("image")
    if kind is None:
        raise FrameError(
            "frame has no image: set `encoded` (JPEG/PNG/WebP bytes) or `raw` (RGB + width/height)"
        )
    if kind == "raw":
        return _decode_raw(frame.raw, limits)
    return _decode_encoded(frame.encoded, limits)


def check_frame_size(frame, limits: Limits) -> None:
    """Cheap checks done on arrival, before the frame is queued."""
    payload = frame.raw.rgb if frame.WhichOneof("image") == "raw" else frame.encoded
    if len(payload) > limits.max_frame_bytes:
        raise FrameError(
            f"frame is {len(payload)} bytes, over the limit of {limits.max_frame_bytes}; "
            "send a smaller image or encode it as JPEG"
        )
    # inf would pass a >= 0 check and then make every later timestamp look like it went back
    if not (math.isfinite(frame.timestamp_s) and frame.timestamp_s >= 0):
        raise FrameError(
            f"timestamp_s must be a finite number >= 0, got {frame.timestamp_s}; "
            "send the frame's time in seconds from the stream's start"
        )


def _check_pixels(width: int, height: int, limits: Limits) -> None:
    if width <= 0 or height <= 0:
        raise FrameError(f"image is {width}x{height}; width and height must be positive")
    if width * height > limits.max_frame_pixels:
        raise FrameError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_frame_pixels}; downscale it before sending"
        )


def _decode_raw(raw, limits: Limits) -> np.ndarray:
    width, height = int(raw.width), int(raw.height)
    _check_pixels(width, height, limits)
    expected = width * height * 3
    if len(raw.rgb) != expected:
        raise FrameError(
            f"raw frame has {len(raw.rgb)} bytes but {width}x{height} RGB needs {expected}; "
            "send packed 8-bit RGB rows, or fix width/height"
        )
    return np.frombuffer(raw.rgb, dtype=np.uint8).reshape(height, width, 3).copy()


def _decode_encoded(data: bytes, limits: Limits) -> np.ndarray:
    if not data:
        raise FrameError("frame.encoded is empty; send a JPEG, PNG or WebP file's bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise FrameError(
            f"image has too many pixels for a frame (the server takes at most {limits.max_frame_pixels:,}); "
            "downscale it before sending"
        ) from exc
    except Exception as exc:  # PIL raises several types for unknown data
        fmt = _sniff(data)
        if fmt is not None:
            # PIL's own words name a BytesIO object at some address: say what it could not read
            reason = "cannot read its header" if isinstance(exc, Image.UnidentifiedImageError) else str(exc)
            raise FrameError(f"{fmt} image is corrupt or truncated ({reason}); re-encode the frame") from exc
        raise FrameError(
            "frame.encoded is not a JPEG, PNG or WebP image "
            f"(starts with {data[:8].hex()}); send one of those formats or a raw RGB frame"
        ) from exc
    _check_pixels(image.width, image.height, limits)
    try:
        image.load()
        rgb = image.convert("RGB")
    except Exception as exc:
        raise FrameError(
            f"{image.format} image is corrupt or truncated ({type(exc).__name__}: {exc}); re-encode the frame"
        ) from exc
    return np.asarray(rgb, dtype=np.uint8)


def _sniff(data: bytes) -> str | None:
    """The supported format `data` claims to be by its magic bytes, if any."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None
