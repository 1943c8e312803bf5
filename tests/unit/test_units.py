import pytest

import memprop
from memprop.units import format_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.5GiB", 1610612736),
        ("512MiB", 512 * 1024**2),
        ("2GB", 2_000_000_000),
        ("4096", 4096),
        ("1k", 1024),
        ("1 KB", 1000),
        (" 3 tib ", 3 * 1024**4),
        (123, 123),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert memprop.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "1.5 parsecs", "-1GiB", "1e3", True, -5])
def test_parse_size_rejects_with_a_clear_error(text: object) -> None:
    with pytest.raises(memprop.MemPropError, match="size"):
        memprop.parse_size(text)  # type: ignore[arg-type]


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1610612736) == "1.50 GiB"
    assert format_bytes(300 * 1024**2) == "300 MiB"
    assert format_bytes(-2048) == "-2.00 KiB"
    assert format_bytes(1023 * 1024**2 + 1000) == "1023 MiB"
