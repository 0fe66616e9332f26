"""Frame decoding and validation: every rejection says what to fix."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from server.config import Limits
from server.images import FrameError, check_frame_size, decode_frame
from vrex.api import vrex_pb2 as pb


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


IMAGE = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_supported_formats_decode_to_rgb(fmt):
    frame = pb.Frame(encoded=_encode(IMAGE, fmt if fmt != "WEBP" else "WEBP"), timestamp_s=1.0)
    out = decode_frame(frame, Limits())
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    if fmt == "PNG":  # lossless
        np.testing.assert_array_equal(out, IMAGE)
    else:
        assert np.abs(out.astype(int) - IMAGE.astype(int)).mean() < 60


def test_raw_rgb_round_trip_and_size_mismatch():
    raw = pb.RawImage(rgb=IMAGE.tobytes(), width=32, height=24)
    np.testing.assert_array_equal(decode_frame(pb.Frame(raw=raw), Limits()), IMAGE)
    bad = pb.RawImage(rgb=IMAGE.tobytes()[:-1], width=32, height=24)
    with pytest.raises(FrameError, match="needs 2304"):
        decode_frame(pb.Frame(raw=bad), Limits())


@pytest.mark.parametrize(
    "frame, match",
    [
        (pb.Frame(), "no image"),
        (pb.Frame(encoded=b""), "no image|empty"),
        (pb.Frame(encoded=b"not an image at all"), "not a JPEG, PNG or WebP"),
        (pb.Frame(encoded=_encode(IMAGE, "BMP")), "not a JPEG, PNG or WebP"),
        (pb.Frame(encoded=_encode(IMAGE, "GIF")), "not a JPEG, PNG or WebP"),
        (pb.Frame(encoded=_encode(IMAGE, "PNG")[:60]), "corrupt or truncated"),
        (pb.Frame(encoded=_encode(IMAGE, "JPEG")[:200]), "corrupt or truncated"),
        (pb.Frame(raw=pb.RawImage(rgb=b"", width=0, height=5)), "must be positive"),
    ],
)
def test_bad_images_are_rejected_with_a_fix(frame, match):
    with pytest.raises(FrameError, match=match):
        decode_frame(frame, Limits())


def test_unreadable_headers_and_bombs_get_the_servers_words():
    with pytest.raises(
        FrameError, match=r"JPEG image is corrupt or truncated \(cannot read its header\)"
    ) as info:
        decode_frame(pb.Frame(encoded=b"\xff\xd8\xff"), Limits())
    assert "0x" not in str(info.value)  # no BytesIO address
    # a PNG header that claims 100000 x 100000 pixels: PIL refuses it before our own check
    png = _encode(IMAGE, "PNG")
    ihdr = b"IHDR" + (100000).to_bytes(4, "big") * 2 + png[24:29]
    bomb = png[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + png[33:]
    with pytest.raises(FrameError, match="at most 8,294,400"):
        decode_frame(pb.Frame(encoded=bomb), Limits())


def test_pixel_limit_checked_before_decoding():
    big = np.zeros((100, 200, 3), np.uint8)
    limits = Limits(max_frame_pixels=100 * 199)
    for frame in (
        pb.Frame(encoded=_encode(big, "PNG")),
        pb.Frame(raw=pb.RawImage(rgb=big.tobytes(), width=200, height=100)),
    ):
        with pytest.raises(FrameError, match="downscale"):
            decode_frame(frame, limits)
    assert (
        decode_frame(pb.Frame(encoded=_encode(big, "PNG")), Limits(max_frame_pixels=100 * 200)).shape
        == big.shape
    )


def test_byte_limit_and_timestamp_checks():
    limits = Limits(max_frame_bytes=1000)
    check_frame_size(pb.Frame(encoded=b"x" * 1000, timestamp_s=0.0), limits)
    with pytest.raises(FrameError, match="over the limit of 1000"):
        check_frame_size(pb.Frame(encoded=b"x" * 1001), limits)
    for ts in (-1.0, float("nan")):
        with pytest.raises(FrameError, match="timestamp_s"):
            check_frame_size(pb.Frame(encoded=b"x", timestamp_s=ts), limits)
