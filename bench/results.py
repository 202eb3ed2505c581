"""What one benchmark part returns: its method, figures and targets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Comparison = Literal["<=", "<", ">="]
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda value, limit: value <= limit,
    "<": lambda value, limit: value < limit,
    ">=": lambda value, limit: value >= limit,
}


@dataclass(frozen=True)
class Target:
    """A goal a figure must reach, e.g. median ratio <= 1.10."""

    name: str
    value: float
    comparison: Comparison
    limit: float
    unit: str = ""

    @property
    def met(self) -> bool:
        return _COMPARE[self.comparison](self.value, self.limit)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "comparison": self.comparison,
            "limit": self.limit,
            "unit": self.unit,
            "met": self.met,
        }


@dataclass
class PartResult:
    """The outcome of one part: figures for latest.json and rows for BENCHMARKS.md."""

    part: str
    title: str
    method: list[str]
    figures: dict[str, Any]
    # Rows of the figures table in BENCHMARKS.md: (what, value as text).
    rows: list[tuple[str, str]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    measured_at: str = ""
    duration_seconds: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "measured_at": self.measured_at,
            "duration_seconds": round(self.duration_seconds, 1),
            "error": self.error,
            "method": self.method,
            "figures": self.figures,
            "targets": [target.to_json() for target in self.targets],
            "notes": self.notes,
        }


def seconds(value: float) -> str:
    """Format a duration for a table: milliseconds below one second."""
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"
