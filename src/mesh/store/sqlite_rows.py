"""Many rows per SQLite statement.

A batch written with ``executemany`` runs one statement per row on the database thread, and
each hands the GIL to the event loop and waits to get it back (up to the 5 ms switch
interval when the loop is busy): a few hundred rows took seconds under load. One statement
with many ``VALUES`` rows, or a long ``IN`` list, crosses once per chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

# Rows (or keys) per statement: 500 rows of 19 parameters, far under SQLite's 32,766.
ROWS_PER_STATEMENT = 500

T = TypeVar("T")


def chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """``items`` a statement's worth at a time."""
    for i in range(0, len(items), ROWS_PER_STATEMENT):
        yield items[i : i + ROWS_PER_STATEMENT]


def values(rows: int, width: int) -> str:
    """The ``VALUES`` list of ``rows`` rows of ``width`` parameters: ``(?, ?), (?, ?)``."""
    return ", ".join(["(" + ", ".join("?" * width) + ")"] * rows)
