import pytest

from cloudbake.core.units import DiskSize, format_size, parse_disk_size, parse_duration, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("2G", 2 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("4096", 4096), ("1T", 1 << 40), ("64k", 64 << 10),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "2X", "-1G", "2 G B", "two"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_disk_size_growth_and_absolute():
    assert parse_disk_size("+20G") == DiskSize(20 << 30, growth=True)
    assert parse_disk_size("25G") == DiskSize(25 << 30, growth=False)
    assert parse_disk_size("+20G").resolve(3 << 30) == 23 << 30
    assert parse_disk_size("25G").resolve(3 << 30) == 25 << 30
    assert str(parse_disk_size("+20G")) == "+20G"


@pytest.mark.parametrize("text", ["+0", "0G", "+", "20 gigs"])
def test_disk_size_rejects(text):
    with pytest.raises(ValueError, match="disk size"):
        parse_disk_size(text)


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("30m", 1800), ("1h30m", 5400), ("250ms", 0.25), ("45", 45), (12, 12),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10x", "m", "1h 30", "soon"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_format_size_is_exact():
    assert format_size(20 << 30) == "20G"
    assert format_size((20 << 30) + 512) == str((20 << 30) + 512)
