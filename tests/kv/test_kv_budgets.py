import pytest

from vrex.kv import TierBudgets, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("1e9", 1_000_000_000),
        ("2GiB", 2 * 1024**3),
        ("512MiB", 512 * 1024**2),
        ("512 mib", 512 * 1024**2),
        ("1.5KiB", 1536),
        ("3GB", 3_000_000_000),
        ("10kb", 10_000),
        ("2g", 2 * 1024**3),
        ("7B", 7),
        (" 1TiB ", 1024**4),
        (123, 123),
    ],
)
def test_parse_bytes_accepts(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "text", ["", "abc", "-1", "2 GiBs", "1.5", "GiB", "1e400", "2XB", "1,000", None, 1.0, True, -5]
)
def test_parse_bytes_rejects_with_value_in_message(text):
    with pytest.raises(ValueError) as err:
        parse_bytes(text)
    assert repr(text) in str(err.value) or str(text) in str(err.value)


def test_tier_budgets_parse_strings_and_name_field():
    budgets = TierBudgets(device_bytes="1MiB", host_bytes=2048)
    assert budgets.device_bytes == 1024**2
    assert budgets.host_bytes == 2048
    with pytest.raises(ValueError, match="host_bytes"):
        TierBudgets(host_bytes="lots")
    with pytest.raises(ValueError, match="device_bytes"):
        TierBudgets(device_bytes=-1)
