"""Many rows per SQLite statement, and the text a SQLite row stores for a datetime.

A batch written with ``executemany`` runs one statement per row on the database thread, and
each hands the GIL to the event loop and waits to get it back (up to the 5 ms switch
interval when the loop is busy): a few hundred rows took seconds under load. One statement
with many ``VALUES`` rows, or a long ``IN`` list, crosses once per chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import TypeVar

from mesh.store.types import as_utc

# Rows (or keys) per statement: 500 rows of 19 parameters, far under SQLite's 32,766.
ROWS_PER_STATEMENT = 500

T = TypeVar("T")
# SQLAlchemy's SQLite DateTime storage format (what Core wrote, and reads back).
DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """``items`` a statement's worth at a time."""
    for i in range(0, len(items), ROWS_PER_STATEMENT):
        yield items[i : i + ROWS_PER_STATEMENT]


def values(rows: int, width: int) -> str:
    """The ``VALUES`` list of ``rows`` rows of ``width`` parameters: ``(?, ?), (?, ?)``."""
    return ", ".join(["(" + ", ".join("?" * width) + ")"] * rows)


def datetime_text(at: datetime) -> str:
    """``at`` (aware) in UTC as :data:`DATETIME_FORMAT` formats it: isoformat with a space
    and always six digits of microseconds is the same text, without strftime's cost (a year
    before 1000 is padded differently: strftime then)."""
    at = as_utc(at).replace(tzinfo=None)
    return at.strftime(DATETIME_FORMAT) if at.year < 1000 else at.isoformat(" ", "microseconds")
