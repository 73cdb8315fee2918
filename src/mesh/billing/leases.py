"""Credit leases and the settlement queue: the request path's billing, off the database.

Measured first (bench/, py-spy): holding and settling credit in the database was three
quarters of a request's CPU. So each gateway process *leases* a block of an API key's
credit — a hold (``lease:<process>:<n>``) taken through :mod:`mesh.billing.settlement`
like any other — and admits requests against it in memory. Settlement queues a charge
on the lease; a flusher writes each lease's charges every ``flush_interval`` seconds in
its own transaction through :func:`settlement.capture`, then hands the usage records to
the usage writer. An idle lease goes back to the account; a lease whose charges use it
up is closed (its row deleted) and the next request opens a new one.

:class:`LeasedLedger` is what the pipeline talks to (see :class:`mesh.seams.Ledger`).
When a lease cannot be had (a short balance, a spend limit near its end) or leases are
off, admission takes an exact per-request hold (:meth:`Ledger.admit`), settled at once.

Failures, and what they cost:

* one lease's batch fails on a row (a bug, a constraint): the batch is split and only the
  failing charge is dropped, logged and counted (``failed_rows``); other leases and other
  accounts are unaffected, as each lease is written in its own transaction;
* the database is unreachable (or a COMMIT reply is lost): charges, checkpoints and exact
  settlements stay queued in memory and are written when it answers again — a re-run of
  a batch that did commit is a no-op (see :mod:`mesh.billing.settlement`);
  :attr:`LeasedLedger.ready` is False meanwhile, and turns True again after a flush that
  wrote every hold a failed write had held up before it (the outage's backlog is in the books);
* the process dies: streams still open have had their usage written every
  ``checkpoint_interval`` seconds (``usage:<request>:<n>`` rows), so what is lost is at
  most ``checkpoint_interval + flush_interval`` seconds of each stream's tokens plus the
  charges of the last ``flush_interval``; its leases are released by any other process
  after ``stale_after`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial

from sqlalchemy.exc import IntegrityError

from mesh.accounts.principal import Principal
from mesh.billing import settlement
from mesh.billing.attribution import Attribution
from mesh.billing.lease_books import _Hold, _Open, _Pending
from mesh.billing.ledger import Admission, Ledger, usage_record
from mesh.billing.money import MicroCredits, format_credits
from mesh.billing.pricing import hold_cost
from mesh.billing.settlement import Settlement
from mesh.billing.usage import UsageWriter
from mesh.canonical import Usage
from mesh.config import Pricing
from mesh.errors import DatabaseUnavailable, InsufficientCredits
from mesh.store import Database, utcnow

log = logging.getLogger("mesh.billing.leases")

LEASE_PREFIX = "lease:"
# A lease covers this many holds of the request that asked for it.
LEASE_REQUESTS = 32
DEFAULT_CHECKPOINT_INTERVAL = 2.0


@dataclass(frozen=True, slots=True)
class LeaseAdmission(Admission):
    """An admission held by a lease, not by its own hold row."""

    lease_id: str = ""


class LeasedLedger:
    """Admission, settlement, checkpoints and re-holds for the pipeline, over leases and
    exact holds alike; everything it writes goes through :mod:`mesh.billing.settlement`."""

    def __init__(
        self,
        ledger: Ledger,
        db: Database,
        usage: UsageWriter | None,
        *,
        flush_interval: float = 0.1,
        idle_after: float = 2.0,
        stale_after: float = 60.0,
        checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
        leases: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        self.db = db
        self.usage = usage
        self.flush_interval = flush_interval
        self.idle_after = idle_after
        self.stale_after = stale_after
        self.checkpoint_interval = checkpoint_interval
        self.leases = leases
        self._clock = clock
        self.process = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.failed_rows = 0  # charges dropped after failing on their own (metric)
        self._leases: dict[str, _Hold] = {}
        self._exact: dict[str, _Hold] = {}  # exact holds with queued charges, by request id
        self._closing: list[_Hold] = []  # holds to release once written
        self._open: dict[str, _Open] = {}
        self._task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._last_sweep = 0.0
        self._serial = 0
        self._unavailable_since: float | None = None
        self._unwritten: set[str] = set()  # ids of holds whose last write found the database unreachable

    def _hold(self, hold_id: str, account_id: str, key_id: str | None, *, held: int = 0) -> _Hold:
        now = self._clock()
        return _Hold(hold_id, account_id, key_id, held=held, last_used=now, touched=now)

    # -- state for readiness and metrics --------------------------------------------------------
    @property
    def ready(self) -> bool:
        """False while writes fail because the database cannot be reached."""
        return self._unavailable_since is None

    @property
    def queued(self) -> int:
        """Charges waiting to be written (the in-memory backlog)."""
        holds = [*self._leases.values(), *self._exact.values(), *self._closing]
        return sum(len(h.pending) for h in holds)

    # -- the request path ---------------------------------------------------------------------
    async def admit(
        self,
        principal: Principal,
        pricing: Pricing,
        request_id: str,
        prompt_tokens_estimate: int,
        max_output_tokens: int,
        *,
        choices: int = 1,
        end_user: str | None = None,
    ) -> Admission:
        """Hold credit for a request: from the key's lease when it has (or can grow) room,
        else an exact hold (which may lower ``max_output_tokens`` or raise 402). A request
        counted against its end user's cap (a key with a user_budget) always takes an exact
        hold: a lease is the key's, not one end user's."""
        need = hold_cost(pricing, prompt_tokens_estimate, max(1, max_output_tokens) * max(1, choices))
        counted = end_user is not None and principal.user_budget is not None
        if self.leases and need > 0 and principal.key_id is not None and not counted:
            leased = await self._lease_admit(
                principal, need, request_id, prompt_tokens_estimate, max_output_tokens, choices
            )
            if leased is not None:
                admission, lease = leased
                self._open[request_id] = _Open(admission, pricing, lease, need, last_checkpoint=self._clock())
                return admission
        try:
            admission = await self.ledger.admit(
                principal, pricing, request_id, prompt_tokens_estimate, max_output_tokens, choices=choices,
                end_user=end_user,
            )
        except (DatabaseUnavailable, asyncio.CancelledError):
            # The hold may have committed with its reply lost (or its caller cancelled while it
            # committed): once the database answers, release whatever its row says (nothing,
            # if it never committed).
            orphan = self._hold(request_id, principal.account_id, principal.key_id)
            orphan.closing = True
            self._closing.append(orphan)
            self.start()
            raise
        hold = None
        if admission.hold_id is not None:
            hold = self._hold(admission.hold_id, admission.account_id, admission.key_id, held=admission.held)
        self._open[request_id] = _Open(admission, pricing, hold, 0, last_checkpoint=self._clock())
        return admission

    async def _lease_admit(
        self, principal: Principal, need: int, request_id: str, prompt_tokens: int, max_output_tokens: int,
        choices: int,
    ) -> tuple[Admission, _Hold] | None:
        while True:
            lease = self._leases.get(principal.key_id)
            if lease is None:
                self._serial += 1  # each lease its own hold row, so a new one never meets a closed one
                lease = self._leases[principal.key_id] = self._hold(
                    f"{LEASE_PREFIX}{self.process}:{self._serial}", principal.account_id, principal.key_id
                )
            if lease.free < need:
                async with lease.lock:
                    if lease.closed or lease.closing:
                        continue  # closed while we waited: open a new one
                    if lease.unsure:
                        await self._resync(lease)
                    if lease.free < need and not await self._grow(lease, need * LEASE_REQUESTS - lease.free):
                        return None  # not enough for a lease: the exact hold decides
            lease.reserved += need
            lease.users += 1
            lease.last_used = self._clock()
            admission = LeaseAdmission(
                request_id, principal.account_id, principal.key_id, MicroCredits(need), max_output_tokens, choices,
                prompt_tokens, lease.id, lease_id=lease.id,
            )
            return admission, lease

    async def _resync(self, lease: _Hold) -> None:
        """Learn what the lease's row holds, after a grow whose outcome its cancelled caller
        never heard: believing too little would grow a second block the balance may not
        cover (a 402 with the credit in this very lease); too much, admit on credit not held.
        Read in a write transaction, so that on SQLite it comes after the one it asks about."""
        lease.held = await self.db.run_write(settlement.held_by, lease.id)
        lease.unsure = False

    async def _grow(self, lease: _Hold, amount: int) -> bool:
        """Hold ``amount`` more for the lease (all of it or nothing). Under the lease's lock,
        so nothing else of this process writes its row meanwhile. The lease learns what it
        holds from the row, and only from a committed transaction."""
        want = lease.held + amount
        for attempt in range(2):
            try:
                held = await self.db.run_write(
                    settlement.hold, hold_id=lease.id, account_id=lease.account_id, key_id=lease.key_id, amount=amount,
                    grow=True,
                )
                lease.held = held  # committed: before that, a rollback would leave it holding nothing
                break
            except asyncio.CancelledError:
                lease.unsure = True  # it may have committed as the cancellation came
                raise
            except settlement.Uncovered:
                return False
            except DatabaseUnavailable as err:
                # A connection lost mid-transaction (or a COMMIT whose reply never came) is not
                # an outage: ask a fresh connection what the row holds. The grow committed if
                # the row has what was wanted (growing again would hold a second block and
                # could refuse a customer who has credit for one); else grow once more. No
                # connection at all: refuse at once, the lease keeping what it knew it had.
                if attempt or not err.connection_lost:
                    raise
                try:
                    async with self.db.read() as conn:
                        row = await conn.run_sync(settlement.held_by, lease.id)
                except asyncio.CancelledError:
                    lease.unsure = True  # the grow may have committed
                    raise
                if row >= want:
                    lease.held = row
                    break
        lease.touched = self._clock()
        self.start()
        return True

    async def rehold(self, admission: Admission, pricing: Pricing) -> Admission:
        """Make the hold cover ``pricing`` (a dearer fallback model serves the request): hold
        the difference or raise ``InsufficientCredits`` (402). Returns the admission to use
        from now on (unchanged when it already covers the price)."""
        open_ = self._open.get(admission.request_id)
        need = hold_cost(pricing, admission.prompt_tokens, admission.output_limit)
        if open_ is None:
            raise RuntimeError(f"rehold of {admission.request_id}, which is not open")
        open_.pricing = pricing
        if need <= admission.held:
            return admission
        extra = need - admission.held
        lease = open_.hold
        if isinstance(admission, LeaseAdmission) and lease is not None:
            if lease.free < extra:
                async with lease.lock:
                    if lease.unsure and not lease.closed:
                        await self._resync(lease)
                    if lease.closed or (lease.free < extra and not await self._grow(lease, extra - lease.free)):
                        raise InsufficientCredits(
                            f"Insufficient credits: the model that can serve this request needs "
                            f"{format_credits(need)} credits held",
                            should_retry=False,
                        )
            lease.reserved += extra
            open_.reserved += extra
            new: Admission = replace(admission, held=MicroCredits(need))
        else:
            made = open_.hold is None
            if made:
                # Nothing held yet (a free model's admission): the row rehold makes is this
                # request's from now on, so that its settlement releases it even if the
                # outcome of the rehold is never heard (cancelled, or its reply lost).
                open_.hold = self._hold(admission.request_id, admission.account_id, admission.key_id)
            try:
                new = await self.ledger.rehold(admission, pricing)
            except InsufficientCredits:
                if made:
                    open_.hold = None  # refused, rolled back: still a free request, nothing to release
                raise
            if open_.hold is not None:
                open_.hold.held = new.held
        open_.admission = new
        return new

    def checkpoint(self, admission: Admission, usage: Usage) -> None:
        """Note a stream's cumulative usage so far (no I/O). Every ``checkpoint_interval``
        the flusher charges what it adds, so a process that dies loses seconds of a long
        stream, not all of it."""
        open_ = self._open.get(admission.request_id)
        if open_ is not None:
            open_.usage = usage

    async def settle(
        self,
        admission: Admission,
        usage: Usage | None,
        *,
        status: str,
        model: str,
        pricing: Pricing,
        replica: str | None = None,
        protocol: str | None = None,
        ttft_ms: int | None = None,
        duration_ms: int | None = None,
        attribution: Attribution | None = None,
        finish_reason: str | None = None,
    ) -> MicroCredits:
        """Charge the request's real cost (minus what its checkpoints charged) and release
        its hold; once per request (later calls return 0). A lease's charge is written by
        the flusher; an exact hold's now, or, if the database is unreachable, as soon as it
        answers. Returns the cost (the charge, unless the balance falls short)."""
        open_ = self._open.pop(admission.request_id, None)
        if open_ is None:
            return MicroCredits(0)  # settled before: a request is charged once
        due, usage = settlement.priced(pricing, usage, admission.output_limit)
        open_.record = partial(
            usage_record, admission, usage, status=status, model=model, replica=replica, protocol=protocol,
            ttft_ms=ttft_ms, duration_ms=duration_ms, attribution=attribution, finish_reason=finish_reason,
            created_at=utcnow(),
        )
        rest = Settlement(f"usage:{admission.request_id}", admission.request_id, max(0, due - open_.checkpointed))
        hold = open_.hold
        if hold is None:  # nothing held: a free request
            if rest.due == 0:
                self._enqueue(open_, 0)
                return MicroCredits(0)
            hold = open_.hold = self._hold(admission.request_id, admission.account_id, admission.key_id)
        if hold.id.startswith(LEASE_PREFIX):
            hold.reserved -= open_.reserved
            hold.users -= 1
            from_hold = min(rest.due, max(0, hold.free))
            hold.charged += from_hold
            hold.pending.append(_Pending(rest, from_hold, open_, final=True))
            hold.last_used = self._clock()
            self._keep_flushing(hold)
            return MicroCredits(due)
        hold.pending.append(_Pending(rest, rest.due, open_, final=True))
        hold.closing = True
        self._exact.pop(hold.id, None)
        try:
            ok = await self._write(hold)
        except asyncio.CancelledError:  # written or not, the flusher writes it (again: idempotent)
            self._closing.append(hold)
            self.start()
            raise
        if not ok:
            self._closing.append(hold)
            self.start()
        return MicroCredits(open_.charged if not hold.pending else due)

    # -- the flusher ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mesh-credit-leases")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except Exception:
                log.exception("flushing credit leases failed; will retry")

    async def flush(self, *, release_all: bool = False) -> int:
        """Queue due checkpoints, write every hold's pending charges (one transaction per
        hold), release idle leases (all, with ``release_all``) and retry holds waiting to be
        released. Returns the number of charges written. Never raises for one hold's
        failure: a hold that cannot be written now stays queued."""
        async with self._flush_lock:
            now = self._clock()
            self._queue_checkpoints(now, force=release_all)
            for lease in list(self._leases.values()):
                if lease.users == 0 and (release_all or now - lease.last_used > self.idle_after):
                    # Closed to new requests before any await: they open a fresh lease.
                    del self._leases[lease.key_id or ""]
                    lease.closing = True
                    self._closing.append(lease)
            work = [
                h for h in (*self._leases.values(), *self._exact.values())
                if h.pending or (h.held and now - h.touched > self.stale_after / 4)
            ]
            written = 0
            held_up = set(self._unwritten)
            for hold in (*work, *self._closing):
                before = len(hold.pending)
                if await self._write(hold):
                    written += before - len(hold.pending)
            self._closing = [h for h in self._closing if not h.closed]
            for rid in [rid for rid, h in self._exact.items() if not h.pending]:
                del self._exact[rid]
            if not held_up & self._unwritten:
                # Every hold that a failed write had held up before this pass is written now:
                # the outage is over for billing. One write succeeding is not enough (a pass
                # that spans the recovery writes some holds and not others), nor is a perfect
                # pass needed: a stray lost connection in this pass is retried in the next, and
                # with many holds it would otherwise keep a healthy process unready for good.
                self._unavailable_since = None
            await self._sweep(now)
            return written

    def _queue_checkpoints(self, now: float, *, force: bool) -> None:
        for open_ in self._open.values():
            if open_.usage is None or open_.hold is None:
                continue
            if not force and now - open_.last_checkpoint < self.checkpoint_interval:
                continue
            due, _ = settlement.priced(open_.pricing, open_.usage, open_.admission.output_limit)
            delta = due - open_.checkpointed
            if delta <= 0:
                continue
            open_.last_checkpoint = now
            open_.checkpointed = due
            open_.checkpoints += 1
            rid = open_.admission.request_id
            hold = open_.hold
            from_hold = min(delta, open_.reserved) if hold.id.startswith(LEASE_PREFIX) else delta
            open_.reserved -= from_hold if hold.id.startswith(LEASE_PREFIX) else 0
            if hold.id.startswith(LEASE_PREFIX):
                hold.reserved -= from_hold
            hold.charged += from_hold
            hold.pending.append(_Pending(Settlement(f"usage:{rid}:{open_.checkpoints}", rid, delta), from_hold,
                                         open_, final=False))
            if hold.id.startswith(LEASE_PREFIX):
                self._keep_flushing(hold)
            else:
                self._exact.setdefault(hold.id, hold)

    def _keep_flushing(self, lease: _Hold) -> None:
        """A lease that was closed (used up, or idle) while a request on it still had
        charges to write: write them (from the balance: its row is gone) and close it again."""
        if self._leases.get(lease.key_id or "") is not lease and lease not in self._closing:
            lease.closing = True
            lease.closed = False
            self._closing.append(lease)

    async def _write(self, hold: _Hold) -> bool:
        """Write the hold's pending charges (and, if closing, release it) in one
        transaction. False when the database could not be reached: all stays queued."""
        async with hold.lock:
            batch = list(hold.pending)
            close = hold.closing  # a settle may close it (and add its charge) while this writes
            try:
                done = await self._capture(hold, batch, close=close)
            except DatabaseUnavailable:
                self._unavailable(hold)
                return False
            except Exception:
                if not batch:
                    log.exception("touching or releasing hold %s failed", hold.id)
                    return False
                # One bad row must not block the rest: write the charges one by one.
                log.exception("writing %d charges on hold %s failed; isolating the bad one", len(batch), hold.id)
                for one in batch:
                    try:
                        self._apply(hold, [one], await self._capture(hold, [one], close=False))
                    except DatabaseUnavailable:
                        self._unavailable(hold)
                        return False
                    except Exception:
                        self.failed_rows += 1
                        log.exception("dropping charge %s (%d micro-credits) on hold %s: it cannot be written",
                                      one.settlement.key, one.settlement.due, hold.id)
                        hold.pending.remove(one)
                        hold.charged -= one.from_hold
                        if one.final:
                            self._enqueue(one.request, one.request.charged)
                self._written(hold)
                return True
            self._apply(hold, batch, done)
            if close and not hold.pending:
                hold.closed = True  # else what came meanwhile is written (and the hold closed) next time
            self._written(hold)
            return True

    async def _capture(self, hold: _Hold, batch: list[_Pending], *, close: bool) -> settlement.Captured:
        for attempt in range(3):
            try:
                return await self.db.run_write(
                    settlement.capture, hold_id=hold.id, account_id=hold.account_id, key_id=hold.key_id,
                    settlements=[p.settlement for p in batch], close=close,
                )
            except (settlement.LedgerRace, IntegrityError):
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _apply(self, hold: _Hold, batch: list[_Pending], done: settlement.Captured) -> None:
        for p in batch:
            hold.pending.remove(p)
            p.request.charged += done.charged.get(p.settlement.key, 0)
            if p.final:
                self._enqueue(p.request, p.request.charged)
        hold.held = done.hold_left
        hold.unsure = False  # the row's amount, read under its lock
        hold.charged = sum(p.from_hold for p in hold.pending)
        hold.touched = self._clock()
        if hold.held == 0 and hold.id.startswith(LEASE_PREFIX) and hold.users == 0 and not hold.pending:
            # Used up: its row is gone. Close it so the next request opens a new one.
            hold.closed = True
            if self._leases.get(hold.key_id or "") is hold:
                del self._leases[hold.key_id or ""]

    def _enqueue(self, open_: _Open, charged: int) -> None:
        if self.usage is not None and open_.record is not None:
            self.usage.enqueue(open_.record(MicroCredits(charged)))
            open_.record = None

    def _written(self, hold: _Hold) -> None:
        self._unwritten.discard(hold.id)

    def _unavailable(self, hold: _Hold) -> None:
        self._unwritten.add(hold.id)
        if self._unavailable_since is None:
            self._unavailable_since = self._clock()
            log.warning("database unreachable: %d charges queued in memory until it answers", self.queued)

    async def _sweep(self, now: float) -> None:
        """Every so often, release leases of processes that died (not touched for a while)."""
        if now - self._last_sweep < self.stale_after / 2:
            return
        self._last_sweep = now
        try:
            released = await self.ledger.release_stale_holds(
                timedelta(seconds=self.stale_after), prefix=LEASE_PREFIX
            )
        except DatabaseUnavailable:
            return
        if released:
            log.warning("released %d credit leases left by stopped gateway processes", released)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush(release_all=True)
        if self.queued:
            log.error("%d charges could not be written before shutdown", self.queued)
