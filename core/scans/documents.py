"""A bounded in-memory cache of uncompressed results documents, by scan id.

A results document never changes once stored: every generation of a Scan
resource and every resubmission gets a new scan id. So a document read once
can be served again without reading and decompressing it from the database.
The caller still reads the scan row to check that the scan exists and belongs
to the user. A deleted scan's document may stay in the cache until it is
pushed out, but nothing can reach it, because that check fails first.
"""

from __future__ import annotations

from collections import OrderedDict


class DocumentCache:
    """Documents by scan id, least recently used out first once ``max_bytes`` is exceeded."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._documents: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0

    @property
    def size(self) -> int:
        """Return the bytes held."""
        return self._size

    def get(self, scan_id: str) -> bytes | None:
        document = self._documents.get(scan_id)
        if document is not None:
            self._documents.move_to_end(scan_id)
        return document

    def put(self, scan_id: str, document: bytes) -> None:
        """Keep ``document``; one larger than half the cache is not kept."""
        if len(document) > self.max_bytes // 2:
            return
        previous = self._documents.pop(scan_id, None)
        if previous is not None:
            self._size -= len(previous)
        self._documents[scan_id] = document
        self._size += len(document)
        while self._size > self.max_bytes:
            _, dropped = self._documents.popitem(last=False)
            self._size -= len(dropped)

    def discard(self, scan_id: str) -> None:
        document = self._documents.pop(scan_id, None)
        if document is not None:
            self._size -= len(document)
