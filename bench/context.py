"""What every benchmark part gets: the test bed, a scratch folder, the run's size and a logger."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.bed import Bed


@dataclass(frozen=True)
class RunContext:
    bed: Bed
    # Scratch folder of this run, removed at the end unless --keep-work is given.
    work_dir: Path
    # Small counts for trying a part out; the figures are not recorded as the project's.
    quick: bool

    def scale(self, full: int, quick: int) -> int:
        """Return the count to use: `quick` in a quick run, `full` otherwise."""
        return quick if self.quick else full


_START = time.monotonic()


def say(message: str) -> None:
    """Print one line of progress to stderr, prefixed with the seconds since the run began."""
    print(f"bench [{time.monotonic() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)
