"""One page of a list that is too long to return whole."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_PAGE_SIZE = 100


@dataclass(frozen=True)
class Page(Generic[T]):
    """Items of page ``page`` (1-based) of ``total`` items, ``page_size`` per page."""

    items: Sequence[T]
    total: int
    page: int
    page_size: int


def page_offset(*, page: int, page_size: int) -> int:
    """Return the number of rows before the first one of ``page`` (1-based)."""
    return (page - 1) * page_size
