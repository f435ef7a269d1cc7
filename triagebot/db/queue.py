"""The intake queue: enqueue (listeners), claim / finish / fail (workers), requeue (admins).

Many workers share it: on PostgreSQL a claim is `SELECT ... FOR UPDATE SKIP LOCKED`; on SQLite the
claim runs inside BEGIN IMMEDIATE, which serializes writers. A worker that dies mid-message leaves its
row in `processing`; once its lease (`stale_claim_seconds`) has run out, any worker takes it again — unless it
has had max_attempts already (a message that kills its worker every time): then it is parked as failed.
Processing a row is one transaction that starts with `hold`: the row locked and still this claim's, so a worker
slower than its lease never stores a message a second time after another worker took it over.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from triagebot import crypto
from triagebot.db.tables import Intake, as_utc, utcnow

QUEUED, PROCESSING, DONE, FAILED = "queued", "processing", "done", "failed"
# flags privacy.purge / privacy.forget set on a row whose raw bytes they removed
REMOVED_FLAGS = ("purged", "forgotten")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claimed:
    """A claimed intake row, detached from its session."""

    id: int
    channel: str
    raw: bytes
    attempts: int
    received_at: datetime
    origin: str | None
    claimed_by: str | None = None


class ClaimLost(RuntimeError):
    """The claimed row is no longer this claim's: its lease ran out and another worker took it, or it is finished."""


def content_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def enqueue(sessions: sessionmaker[Session], channel: str, raw: bytes, *, origin: str | None = None,
            delivery_key: str | None = None, flags: list[str] | None = None) -> int | None:
    """Store one raw message durably and return its id; None when this delivery_key was stored before.

    When this returns, the row is committed: only then may a listener say 250. The raw bytes are stored
    sealed when TRIAGEBOT_ENCRYPTION_KEY is set (triagebot/crypto.py).
    """
    row = Intake(channel=channel, raw=crypto.seal(raw), content_hash=content_hash(raw), origin=origin,
                 delivery_key=delivery_key, flags=flags or [], received_at=utcnow(), not_before=utcnow())
    with sessions() as s:
        s.add(row)
        try:
            s.commit()
        except IntegrityError:
            s.rollback()
            if delivery_key is None:
                raise
            return None  # a redelivery (Slack retry, IMAP re-fetch): already stored
        return row.id


def claim(sessions: sessionmaker[Session], worker: str, limit: int = 1, lease_seconds: int = 300,
          max_attempts: int | None = None) -> list[Claimed]:
    """Take up to `limit` rows to work on: queued ones whose time has come, or ones whose lease ran out.

    A row whose lease ran out after its max_attempts-th attempt is parked as failed instead: whatever it does
    to the workers that take it (a crash, a hang), it has done it often enough."""
    now = utcnow()
    stale = now - timedelta(seconds=lease_seconds)
    with sessions() as s, s.begin():
        # lock the ids first, then read the rows: sorting a deep backlog with its payloads spills to disk
        q = (select(Intake.id)
             .where(((Intake.state == QUEUED) & (Intake.not_before <= now))
                    | ((Intake.state == PROCESSING) & (Intake.claimed_at < stale)))
             .order_by(Intake.id).limit(limit)
             .with_for_update(skip_locked=True))
        ids = list(s.scalars(q))
        rows = list(s.scalars(select(Intake).where(Intake.id.in_(ids)).order_by(Intake.id))) if ids else []
        out = []
        for r in rows:
            if r.state == PROCESSING and max_attempts is not None and r.attempts >= max_attempts:
                r.state, r.finished_at = FAILED, now
                r.last_error = (f"worker {r.claimed_by} stopped while processing it (attempt {r.attempts} of "
                                f"{max_attempts}; lease {lease_seconds}s ran out)")[:2000]
                r.claimed_at = r.claimed_by = None
                log.error("intake %s parked: %s", r.id, r.last_error)
                continue
            r.state, r.claimed_at, r.claimed_by, r.attempts = PROCESSING, now, worker, r.attempts + 1
            plain = _opened(r)
            if plain is not None:
                out.append(Claimed(r.id, r.channel, plain, r.attempts, as_utc(r.received_at), r.origin, worker))
        return out


def hold(s: Session, item: Claimed) -> None:
    """Begin processing a claimed row in the caller's transaction: lock the row and check the claim is still
    this one (same worker, same attempt, still processing); ClaimLost when it is not.

    The lock keeps a worker whose lease runs out in the middle of the message from losing the row to another
    (their claim skips locked rows); the check stops a worker that lost its row before it began."""
    row = s.execute(select(Intake.state, Intake.claimed_by, Intake.attempts).where(Intake.id == item.id)
                    .with_for_update()).one_or_none()
    if row is None or row.state != PROCESSING or row.attempts != item.attempts or (
            item.claimed_by is not None and row.claimed_by != item.claimed_by):
        now = "gone" if row is None else f"{row.state}, claimed by {row.claimed_by}, attempt {row.attempts}"
        raise ClaimLost(f"intake {item.id}: claimed by {item.claimed_by} for attempt {item.attempts}, now {now}")


def release(sessions: sessionmaker[Session], ids: list[int], worker: str) -> int:
    """Give claimed rows this worker will not process (it is stopping) back to the queue, attempt not counted."""
    if not ids:
        return 0
    with sessions() as s, s.begin():
        res = s.execute(update(Intake).where(Intake.id.in_(ids), Intake.state == PROCESSING,
                                             Intake.claimed_by == worker)
                        .values(state=QUEUED, claimed_at=None, claimed_by=None, attempts=Intake.attempts - 1))
        return res.rowcount or 0


def _opened(r: Intake) -> bytes | None:
    """The row's plaintext; or None after parking the row when it has none (wrong or missing key, purged).

    Parking instead of raising keeps one unreadable row from failing every claim of its batch again and again.
    """
    removed = [f for f in (r.flags or []) if f in REMOVED_FLAGS]
    if removed and not r.raw:
        why, flag = f"raw message removed ({removed[0]})", None
    else:
        try:
            return crypto.unseal(r.raw)
        except crypto.CryptoError as e:
            why, flag = f"encryption: {e}", "undecryptable"
    r.state, r.finished_at, r.last_error = FAILED, utcnow(), why
    r.claimed_at = r.claimed_by = None
    if flag and flag not in (r.flags or []):
        r.flags = list(r.flags or []) + [flag]
    log.error("intake %s parked: %s", r.id, why)
    return None


def mark_done(s: Session, intake_id: int) -> None:
    """Finish a row inside the caller's transaction, so its results and its state commit together."""
    s.execute(update(Intake).where(Intake.id == intake_id)
              .values(state=DONE, finished_at=utcnow(), last_error=None))


def mark_failed(sessions: sessionmaker[Session], intake_id: int, error: str, max_attempts: int,
                base_delay: float = 5.0, claimed_by: str | None = None) -> str:
    """Record a failure: retry later with exponential backoff, or park as failed after max_attempts.

    With claimed_by, only while the row is still that worker's claim (not taken over by another meanwhile)."""
    with sessions() as s, s.begin():
        row = s.get(Intake, intake_id, with_for_update=True)
        if row is None:
            return FAILED
        if claimed_by is not None and (row.state != PROCESSING or row.claimed_by != claimed_by):
            return row.state
        row.last_error = error[:2000]
        if row.attempts >= max_attempts:
            row.state, row.finished_at = FAILED, utcnow()
        else:
            row.state = QUEUED
            row.not_before = utcnow() + timedelta(seconds=base_delay * 2 ** (row.attempts - 1))
        row.claimed_at = row.claimed_by = None
        return row.state


def requeue(sessions: sessionmaker[Session], ids: list[int] | None = None) -> int:
    """Put failed rows (all, or the given ids) back in the queue with a fresh attempt count."""
    with sessions() as s, s.begin():
        q = update(Intake).where(Intake.state == FAILED)
        if ids:
            q = q.where(Intake.id.in_(ids))
        res = s.execute(q.values(state=QUEUED, attempts=0, not_before=utcnow(), last_error=None))
        return res.rowcount or 0


def counts(sessions: sessionmaker[Session]) -> dict[str, int]:
    """How many intake rows are in each state."""
    with sessions() as s:
        return {state: n for state, n in s.execute(select(Intake.state, func.count()).group_by(Intake.state))}


def claim_one(sessions: sessionmaker[Session], intake_id: int, worker: str) -> Claimed:
    """Claim one given row (for `triagebot ingest`, which processes what it just stored, in order)."""
    with sessions() as s, s.begin():
        r = s.get(Intake, intake_id, with_for_update=True)
        r.state, r.claimed_at, r.claimed_by, r.attempts = PROCESSING, utcnow(), worker, r.attempts + 1
        plain = _opened(r)
        if plain is not None:
            return Claimed(r.id, r.channel, plain, r.attempts, as_utc(r.received_at), r.origin, worker)
        why = r.last_error
    # raised only after the parking has committed
    raise crypto.CryptoError(f"intake {intake_id}: {why}")
