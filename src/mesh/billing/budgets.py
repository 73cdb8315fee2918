"""Key budgets that reset: a key's ``spend_limit`` counted per period.

A key's budget is its ``spend_limit`` with a ``budget_period``: ``none`` (over the key's
life, the default), ``daily``, ``weekly`` or ``monthly``, in UTC, with an optional reset
day (weekday 0-6, Monday first, for weekly; day of the month 1-28 for monthly). The key's
``spent`` is what it spent this period and ``budget_resets_at`` when the period ends.

The period rolls over inside the settlement core's write transactions (:func:`roll`, called
by :func:`mesh.billing.settlement.hold` and ``capture`` before they read or use the key's
``spent``): one conditional update, so under any concurrency exactly one transaction zeroes
``spent`` and sets the next reset, and every other one sees the new period. Credit held
across a rollover stays held and counts against the new period (it is spent in it).

:func:`now` is the clock of budgets. ``MESH_CLOCK_OFFSET_SECONDS`` (read once, at start)
moves it, so that tests can run a gateway "tomorrow"; nothing else sets it.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Literal, get_args

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection

from mesh.errors import InvalidRequest
from mesh.store import utcnow
from mesh.store.tables import api_keys

Period = Literal["none", "daily", "weekly", "monthly"]
PERIODS: tuple[str, ...] = get_args(Period)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

_OFFSET = timedelta(seconds=float(os.environ.get("MESH_CLOCK_OFFSET_SECONDS") or 0))


def now() -> datetime:
    """The current UTC time as budgets see it."""
    return utcnow() + _OFFSET


def check(period: str, reset_day: int | None) -> tuple[Period, int | None]:
    """``(period, reset_day)`` validated, with the reset day defaulted (Monday; the 1st);
    ``InvalidRequest`` names the bad field."""
    if period not in PERIODS:
        raise InvalidRequest(f"budget_period must be one of {', '.join(PERIODS)}", param="budget_period")
    if reset_day is not None and (isinstance(reset_day, bool) or not isinstance(reset_day, int)):
        raise InvalidRequest("budget_reset_day must be a whole number", param="budget_reset_day")
    if period == "weekly":
        day = 0 if reset_day is None else reset_day
        if not 0 <= day <= 6:
            raise InvalidRequest(
                "budget_reset_day of a weekly budget is a weekday, 0 (Monday) to 6", param="budget_reset_day"
            )
        return "weekly", day
    if period == "monthly":
        day = 1 if reset_day is None else reset_day
        if not 1 <= day <= 28:
            raise InvalidRequest(
                "budget_reset_day of a monthly budget is a day of the month, 1 to 28", param="budget_reset_day"
            )
        return "monthly", day
    if reset_day is not None:
        raise InvalidRequest(f"a {period} budget has no reset day", param="budget_reset_day")
    return "daily" if period == "daily" else "none", None


def next_reset(period: str | None, reset_day: int | None, at: datetime) -> datetime | None:
    """When the period that contains ``at`` ends (UTC midnight); None for no period."""
    midnight = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        return midnight + timedelta(days=1)
    if period == "weekly":
        ahead = ((reset_day or 0) - midnight.weekday()) % 7 or 7
        return midnight + timedelta(days=ahead)
    if period == "monthly":
        day = reset_day or 1
        this = midnight.replace(day=day)
        if this > at:
            return this
        year, month = (midnight.year + 1, 1) if midnight.month == 12 else (midnight.year, midnight.month + 1)
        return this.replace(year=year, month=month)
    return None


_DUE = (
    select(api_keys.c.budget_period, api_keys.c.budget_reset_day)
    .where(api_keys.c.id == bindparam("k"), api_keys.c.budget_resets_at <= bindparam("now"))
    .with_for_update()
)
_ROLL = (
    update(api_keys)
    .where(api_keys.c.id == bindparam("k"), api_keys.c.budget_resets_at <= bindparam("now"))
    .values(spent=0, budget_resets_at=bindparam("next"))
)


def roll(conn: Connection, key_id: str, at: datetime | None = None) -> bool:
    """Start the key's new budget period if its current one has ended (inside the caller's
    write transaction, after it locked the account); True when it did."""
    at = at or now()
    due = (conn.execute(_DUE, {"k": key_id, "now": at})).first()
    if due is None:
        return False
    nxt = next_reset(due.budget_period, due.budget_reset_day, at)
    return (conn.execute(_ROLL, {"k": key_id, "now": at, "next": nxt})).rowcount == 1
