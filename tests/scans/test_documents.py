"""The cache of results documents: bounded by bytes, least recently used out first."""

from __future__ import annotations

from secapi.core.scans.documents import DocumentCache


def test_least_recently_used_goes_first() -> None:
    cache = DocumentCache(max_bytes=30)
    cache.put("a", b"a" * 10)
    cache.put("b", b"b" * 10)
    cache.put("c", b"c" * 10)
    assert cache.get("a") == b"a" * 10  # now "b" is the least recently used

    cache.put("d", b"d" * 10)

    assert cache.get("b") is None
    assert cache.get("a") == b"a" * 10
    assert cache.get("c") == b"c" * 10
    assert cache.get("d") == b"d" * 10
    assert cache.size == 30


def test_document_over_half_the_cache_is_not_kept() -> None:
    cache = DocumentCache(max_bytes=30)
    cache.put("small", b"s" * 15)
    cache.put("large", b"l" * 16)

    assert cache.get("large") is None
    assert cache.get("small") == b"s" * 15
    assert cache.size == 15


def test_replacing_and_discarding_keep_the_size_right() -> None:
    cache = DocumentCache(max_bytes=100)
    cache.put("a", b"a" * 10)
    cache.put("a", b"A" * 20)
    assert cache.get("a") == b"A" * 20
    assert cache.size == 20

    cache.discard("a")
    cache.discard("never stored")

    assert cache.get("a") is None
    assert cache.size == 0


def test_size_zero_keeps_nothing() -> None:
    cache = DocumentCache(max_bytes=0)
    cache.put("a", b"x")

    assert cache.get("a") is None
    assert cache.size == 0
