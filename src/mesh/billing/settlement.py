"""The settlement core: the one place that holds, captures and releases credit.

A *hold* is a row of ``holds`` — ``<request id>`` for an exact per-request hold,
``lease:<process>:<n>`` for a process's credit lease — whose amount is also counted in
``accounts.held`` and ``api_keys.held``. Both kinds go through the same three operations,
each a few statements inside the caller's write transaction:

* :func:`hold` adds to a hold (creating its row): conditional updates, all or nothing.
* :func:`capture` charges a batch of :class:`Settlement` s against one hold and, with
  ``close``, releases the rest. It locks the account, the key and the hold row (in that
  order, everywhere; a key's budget period rolls over first, see
  :mod:`mesh.billing.budgets`), skips settlements whose ledger row already exists, charges each from
  the hold first and then, when the hold falls short, from the account's free balance
  (within the key's spend limit); only what neither covers is a *shortfall*, noted in the
  row's memo. A hold that reaches zero is deleted, never updated to zero.
* :func:`release` is ``capture`` of nothing with ``close``.

They are synchronous functions of a SQLAlchemy ``Connection``: a caller runs one inside its
write transaction with ``AsyncConnection.run_sync``, or a whole transaction of them with
:meth:`mesh.store.Database.run_write` (SQLite: in the writer thread, handed over once).

Why this cannot lose or double-count money: every amount moved is derived from rows read
under lock in the same transaction (the hold row's amount, ledger rows already written),
never from the caller's memory. Re-running a batch whose COMMIT reply was lost finds its
ledger rows and its smaller hold and changes nothing; a hold grown under an unknown
outcome is released by what its row says. Ledger rows are inserted with ``ON CONFLICT
(idempotency_key) DO NOTHING`` and the insert must write every row planned, or the
transaction is rolled back (:class:`LedgerRace`), so balances move only with rows written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import chain
from typing import Any

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection

from mesh.billing import budgets
from mesh.billing.money import MicroCredits, format_credits
from mesh.billing.pricing import cost
from mesh.canonical import Usage
from mesh.config import Pricing
from mesh.errors import NotFound
from mesh.store import sqlite_rows, utcnow
from mesh.store.tables import accounts, api_keys, holds, key_user_spend
from mesh.store.types import as_utc

log = logging.getLogger("mesh.billing.settlement")

# Hot-path statements, built once: constructing SQLAlchemy expressions per request was a
# measured fifth of a request's CPU (bench/results, py-spy).
HOLD_ACCOUNT = (
    update(accounts)
    .where(accounts.c.id == bindparam("a"), accounts.c.balance - accounts.c.held >= bindparam("h"))
    .values(held=accounts.c.held + bindparam("h"))
)
HOLD_KEY = (
    update(api_keys)
    .where(
        api_keys.c.id == bindparam("k"),
        api_keys.c.spend_limit.is_(None)
        | (api_keys.c.spend_limit - api_keys.c.spent - api_keys.c.held >= bindparam("h")),
    )
    .values(held=api_keys.c.held + bindparam("h"))
)
_GROW_HOLD = (
    update(holds)
    .where(holds.c.request_id == bindparam("r"))
    .values(amount=holds.c.amount + bindparam("h"), created_at=bindparam("t"))
    .returning(holds.c.amount)
)
_LOCK_ACCOUNT = (
    select(accounts.c.balance, accounts.c.held, accounts.c.reversed)
    .where(accounts.c.id == bindparam("a"))
    .with_for_update()
)
_LOCK_KEY = (
    select(api_keys.c.spend_limit, api_keys.c.spent, api_keys.c.held)
    .where(api_keys.c.id == bindparam("k"))
    .with_for_update()
)
_LOCK_HOLD = (
    select(holds.c.amount, holds.c.end_user).where(holds.c.request_id == bindparam("r")).with_for_update()
)
# Per end user caps (api_keys.user_budget): the end user's row, seeded at 0 and rolled over
# to the key's current budget period before it is used (like the key's own, see budgets).
_KEY_USER_BUDGET = select(api_keys.c.user_budget, api_keys.c.budget_resets_at).where(api_keys.c.id == bindparam("k"))
_ROLL_USER = (
    update(key_user_spend)
    .where(
        key_user_spend.c.key_id == bindparam("k"), key_user_spend.c.end_user == bindparam("u"),
        key_user_spend.c.resets_at.is_distinct_from(bindparam("p")),
    )
    .values(spent=0, resets_at=bindparam("p"))
)
_LOCK_USER = (
    select(key_user_spend.c.spent, key_user_spend.c.held)
    .where(key_user_spend.c.key_id == bindparam("k"), key_user_spend.c.end_user == bindparam("u"))
    .with_for_update()
)
_CAPTURE_USER = (
    update(key_user_spend)
    .where(key_user_spend.c.key_id == bindparam("k"), key_user_spend.c.end_user == bindparam("u"))
    .values(held=key_user_spend.c.held - bindparam("r"), spent=key_user_spend.c.spent + bindparam("t"))
)
_CAPTURE_ACCOUNT = (
    update(accounts)
    .where(accounts.c.id == bindparam("a"))
    .values(balance=accounts.c.balance - bindparam("t"), held=accounts.c.held - bindparam("u"))
)
_CAPTURE_KEY = (
    update(api_keys)
    .where(api_keys.c.id == bindparam("k"))
    .values(held=api_keys.c.held - bindparam("u"), spent=api_keys.c.spent + bindparam("t"))
)
_SET_HOLD = update(holds).where(holds.c.request_id == bindparam("r")).values(
    amount=bindparam("left"), created_at=bindparam("now")
)
_DELETE_HOLD = delete(holds).where(holds.c.request_id == bindparam("r"))


# Balances are 64-bit integers on both databases: no account can cover a hold above this,
# and binding a larger one fails in the driver (a 500) instead of refusing it.
MAX_AMOUNT = 2**63 - 1


class Uncovered(Exception):
    """The account (or the key's spend limit) cannot cover a hold; raise it out of the
    transaction so that its partial updates roll back."""


class LedgerRace(Exception):
    """A ledger row planned in this transaction was written by another one meanwhile:
    roll back and run again (the retry finds the row and skips it)."""


@dataclass(frozen=True, slots=True)
class Settlement:
    """One charge to write: ``due`` micro-credits under the ledger idempotency ``key``
    (``usage:<request id>``, or ``usage:<request id>:<n>`` for a stream's checkpoint)."""

    key: str
    request_id: str
    due: int


@dataclass(frozen=True, slots=True)
class Captured:
    """What :func:`capture` did: the charge of every settlement by key (including rows
    written before, which were skipped), the keys whose rows it wrote, and what the hold
    holds afterwards (0: its row is gone)."""

    charged: Mapping[str, int]
    written: frozenset[str]
    hold_left: int


def priced(pricing: Pricing, usage: Usage | None, output_limit: int | None) -> tuple[MicroCredits, Usage]:
    """The cost of ``usage`` and the usage it was computed from.

    Nothing generated (``None`` or all zeros) costs nothing, not even the request fee. An
    engine that reports more output than the request could produce (``output_limit``:
    ``max_tokens`` times ``n``) is not trusted: the output is capped there, and logged.
    """
    usage = usage or Usage()
    if usage.input_tokens == 0 and usage.output_tokens == 0:
        return MicroCredits(0), usage
    if output_limit is not None and usage.output_tokens > output_limit:
        log.warning("engine reported %d output tokens for a request limited to %d; capped",
                    usage.output_tokens, output_limit)
        usage = Usage(
            input_tokens=usage.input_tokens, cached_tokens=usage.cached_tokens, output_tokens=output_limit,
            reasoning_tokens=min(usage.reasoning_tokens, output_limit),
        )
    return cost(pricing, usage), usage


def user_room(conn: Connection, key_id: str, end_user: str) -> int | None:
    """What the key's cap for ``end_user`` still allows this period (None: the key has no
    user_budget). Seeds and rolls the end user's row; call after :func:`budgets.roll`."""
    key = (conn.execute(_KEY_USER_BUDGET, {"k": key_id})).first()
    if key is None or key.user_budget is None:
        return None
    _seed_user(conn, key_id, end_user, key.budget_resets_at)
    conn.execute(_ROLL_USER, {"k": key_id, "u": end_user, "p": key.budget_resets_at})
    row = (conn.execute(_LOCK_USER, {"k": key_id, "u": end_user})).one()
    return int(key.user_budget) - int(row.spent) - int(row.held)


def _dialect(conn: Connection) -> Any:
    """The dialect module whose ``insert`` has ``on_conflict_do_nothing``."""
    if conn.dialect.name != "postgresql":
        return sqlite
    # Here, not at the top: SQLAlchemy's PostgreSQL dialect (~35 ms of imports at start) is
    # loaded only with a PostgreSQL database, where this import finds it loaded.
    from sqlalchemy.dialects import postgresql

    return postgresql


def _seed_user(conn: Connection, key_id: str, end_user: str, period: Any) -> None:
    conn.execute(
        _dialect(conn).insert(key_user_spend)
        .values(key_id=key_id, end_user=end_user, spent=0, held=0, resets_at=period)
        .on_conflict_do_nothing(index_elements=[key_user_spend.c.key_id, key_user_spend.c.end_user])
    )


def hold(
    conn: Connection, *, hold_id: str, account_id: str, key_id: str | None, amount: int, grow: bool,
    end_user: str | None = None,
) -> int:
    """Hold ``amount`` more on ``hold_id`` and return what its row holds now.

    ``grow`` False creates the row (an ``IntegrityError`` if it exists); True adds to it,
    creating it if missing. With ``end_user`` (a key with a user_budget), the end user's
    cap must cover it too, and the hold row remembers whose it is. Raises
    :class:`Uncovered` when the account's free balance, the key's spend limit or the end
    user's cap cannot cover ``amount``; the caller must let it roll back the transaction.
    """
    if amount > MAX_AMOUNT:
        raise Uncovered  # e.g. a huge max_tokens on a model without a context length
    params = {"a": account_id, "k": key_id, "h": amount}
    if (conn.execute(HOLD_ACCOUNT, params)).rowcount != 1:
        raise Uncovered
    if key_id is not None:
        budgets.roll(conn, key_id)  # a budget's new period starts before it is used
        if (conn.execute(HOLD_KEY, params)).rowcount != 1:
            raise Uncovered
        if end_user is not None:
            room = user_room(conn, key_id, end_user)
            if room is None:
                end_user = None  # the cap was lifted: nothing to count
            elif room < amount:
                raise Uncovered
            else:  # the row is locked (user_room): nothing can take the room meanwhile
                conn.execute(_CAPTURE_USER, {"k": key_id, "u": end_user, "r": -amount, "t": 0})
    now = utcnow()
    if grow:
        grown = (conn.execute(_GROW_HOLD, {"r": hold_id, "h": amount, "t": now})).scalar_one_or_none()
        if grown is not None:
            return int(grown)
    conn.execute(
        holds.insert().values(
            request_id=hold_id, account_id=account_id, key_id=key_id, amount=amount, created_at=now,
            end_user=end_user,
        )
    )
    return amount


def held_by(conn: Connection, hold_id: str) -> int:
    """What ``hold_id``'s row holds now (0 when there is no row)."""
    amount = (conn.execute(select(holds.c.amount).where(holds.c.request_id == hold_id))).scalar_one_or_none()
    return int(amount or 0)


def _shortfall(due: int, charge: int) -> str | None:
    if charge >= due:
        return None
    return f"shortfall: cost {format_credits(due)}, charged {format_credits(charge)}"


def capture(
    conn: Connection,
    *,
    hold_id: str,
    account_id: str,
    key_id: str | None,
    settlements: Sequence[Settlement],
    close: bool,
) -> Captured:
    """Charge ``settlements`` (in order) against the hold ``hold_id``; with ``close``,
    release what is left of it. See the module docstring for the rules. Raises
    ``NotFound`` for an unknown account and :class:`LedgerRace` (retry) when another
    transaction wrote one of the planned ledger rows first."""
    acct = (conn.execute(_LOCK_ACCOUNT, {"a": account_id})).first()
    if acct is None:
        raise NotFound(f"Account {account_id!r} not found", code="account_not_found")
    key = None
    if key_id is not None:
        budgets.roll(conn, key_id)
        key = (conn.execute(_LOCK_KEY, {"k": key_id})).first()
    row = (conn.execute(_LOCK_HOLD, {"r": hold_id})).first()
    held_here = 0 if row is None else int(row.amount)
    end_user = None if row is None or key_id is None else row.end_user
    user_left = None if end_user is None or key_id is None else user_room(conn, key_id, end_user)

    charged: dict[str, int] = {}
    wanted = [s.key for s in settlements]
    if wanted:
        charged = {k: -int(amount) for k, amount in _ledger_amounts(conn, wanted)}

    from_hold = held_here
    # Credit nobody holds; below zero after a refund or dispute took credit back while
    # requests were in flight: then only their holds pay (see migration 0008).
    free = int(acct.balance) - int(acct.held)
    room: int | None = None
    if key is not None and key.spend_limit is not None:
        room = int(key.spend_limit) - int(key.spent) - int(key.held)
    balance = int(acct.balance)
    now = utcnow()
    rows: list[tuple[Any, ...]] = []  # ledger rows, _LEDGER_ROW's columns but created_at (``now`` for all)
    reversed_after = int(acct.reversed)
    for s in settlements:
        if s.key in charged:
            continue  # written before (a retry after a lost COMMIT reply, or a second settle)
        take = min(s.due, from_hold)
        from_hold -= take
        extra = max(0, min(s.due - take, free, s.due - take if room is None else room,
                           s.due - take if user_left is None else user_left))
        free -= extra
        if room is not None:
            room -= extra
        if user_left is not None:
            user_left -= extra
        charge = take + extra
        charged[s.key] = charge
        if charge:
            balance -= charge
            rows.append((account_id, "usage", -charge, balance, reversed_after, s.key, s.request_id, key_id,
                         _shortfall(s.due, charge)))

    total = int(acct.balance) - balance
    released = held_here - from_hold + (from_hold if close else 0)
    if total or released:
        conn.execute(_CAPTURE_ACCOUNT, {"a": account_id, "t": total, "u": released})
        if key_id is not None:
            conn.execute(_CAPTURE_KEY, {"k": key_id, "t": total, "u": released})
        if end_user is not None:
            conn.execute(_CAPTURE_USER, {"k": key_id, "u": end_user, "r": released, "t": total})
    left = held_here - released
    if row is not None:
        if left == 0:
            conn.execute(_DELETE_HOLD, {"r": hold_id})
        else:
            conn.execute(_SET_HOLD, {"r": hold_id, "left": left, "now": now})
    if rows:
        _insert_rows(conn, rows, now)
    return Captured(charged, frozenset(r[_KEY] for r in rows), left)


# The two statements of a capture that grow with its batch, in plain SQL in the driver's
# parameter style: Core recompiled the IN list and the many-row INSERT at every flush (the
# larger part of a capture's CPU). The values are the ones Core would bind.
# created_at stays last: every row of a capture has the same, bound apart (an aware UTC
# datetime, or SQLite's text form made once per batch).
_LEDGER_ROW = ("account_id", "kind", "amount", "balance_after", "reversed_after", "idempotency_key", "request_id",
               "key_id", "memo", "created_at")
_KEY = _LEDGER_ROW.index("idempotency_key")
_PG_TYPES = ("text", "text", "bigint", "bigint", "bigint", "text", "text", "text", "text", "timestamptz")
# Rows go in in the batch's order (ORDER BY their ordinal), as Core's multi-row INSERT did:
# ledger ids follow the order of balance_after.
_INSERT_LEDGER_PG = (
    f"INSERT INTO ledger ({', '.join(_LEDGER_ROW)}) SELECT {', '.join(_LEDGER_ROW)} FROM unnest("
    + ", ".join(f"${i}::{t}[]" for i, t in enumerate(_PG_TYPES, 1))
    + f") WITH ORDINALITY AS t({', '.join(_LEDGER_ROW)}, n) ORDER BY n "
    "ON CONFLICT (idempotency_key) DO NOTHING RETURNING idempotency_key"
)


def _ledger_amounts(conn: Connection, keys: list[str]) -> list[tuple[str, int]]:
    """(idempotency key, amount) of the ledger rows already written under ``keys``."""
    if conn.dialect.name == "postgresql":
        sql = "SELECT idempotency_key, amount FROM ledger WHERE idempotency_key = ANY($1::text[])"
        found: Any = conn.exec_driver_sql(sql, (keys,))
        return [(str(row[0]), int(row[1])) for row in found]
    out: list[tuple[str, int]] = []
    for chunk in sqlite_rows.chunks(keys):
        sql = f"SELECT idempotency_key, amount FROM ledger WHERE idempotency_key IN ({','.join('?' * len(chunk))})"
        some: Any = conn.exec_driver_sql(sql, tuple(chunk))
        out.extend((str(row[0]), int(row[1])) for row in some)
    return out


def _insert_rows(conn: Connection, rows: list[tuple[Any, ...]], at: datetime) -> None:
    """Insert ledger ``rows`` (all but created_at, which is ``at`` for each), all or none."""
    written: set[str] = set()
    if conn.dialect.name == "postgresql":
        columns: list[list[Any]] = [list(column) for column in zip(*rows, strict=True)]
        columns.append([as_utc(at)] * len(rows))
        written.update(str(row[0]) for row in conn.exec_driver_sql(_INSERT_LEDGER_PG, tuple(columns)))
    else:
        stamp = sqlite_rows.datetime_text(at)
        for chunk in sqlite_rows.chunks(rows):
            values = sqlite_rows.values(len(chunk), len(_LEDGER_ROW))
            sql = (f"INSERT INTO ledger ({', '.join(_LEDGER_ROW)}) VALUES {values} "
                   "ON CONFLICT (idempotency_key) DO NOTHING")
            # The count of rows inserted, not RETURNING: reading each returned row back is a
            # step of its own, and each hands the GIL over (a busy event loop keeps it).
            params = tuple(chain.from_iterable((*r, stamp) for r in chunk))
            if conn.exec_driver_sql(sql, params).rowcount == len(chunk):
                written.update(r[_KEY] for r in chunk)
    if len(written) != len(rows):
        raise LedgerRace(f"{len(rows) - len(written)} ledger rows were written by another transaction")


def release(conn: Connection, *, hold_id: str, account_id: str, key_id: str | None) -> int:
    """Release the whole hold ``hold_id`` (what its row says); returns the amount."""
    row = (conn.execute(select(holds.c.amount).where(holds.c.request_id == hold_id))).first()
    if row is None:
        return 0
    capture(conn, hold_id=hold_id, account_id=account_id, key_id=key_id, settlements=(), close=True)
    return int(row.amount)
