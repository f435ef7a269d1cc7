"""The database tables (SQLAlchemy 2). Migrations live in triagebot/db/migrations (Alembic)."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, BigInteger, DateTime, ForeignKey, Index, Integer, LargeBinary, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets BIGINT identity.
BigID = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(t: datetime) -> datetime:
    """A stored time, timezone-aware: SQLite hands back naive UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class Intake(Base):
    """The durable queue: every message exactly as received. Listeners write here and nothing else."""

    __tablename__ = "intake"
    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(16))                 # email | slack
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    content_hash: Mapped[str] = mapped_column(String(64))
    # a key the channel gives that makes a redelivery recognisable (Slack event_id, IMAP mailbox/uidvalidity/uid)
    delivery_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    origin: Mapped[str | None] = mapped_column(String(255))          # listener, peer, mailbox, file path
    state: Mapped[str] = mapped_column(String(16), default="queued")  # queued | processing | done | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    flags: Mapped[list] = mapped_column(JSON, default=list)
    __table_args__ = (Index("ix_intake_state_not_before", "state", "not_before", "id"),)


class Case(Base):
    """A support case: what agents work on."""

    __tablename__ = "cases"
    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    reference: Mapped[str | None] = mapped_column(String(32), unique=True)
    customer: Mapped[str | None] = mapped_column(String(255), index=True)
    customer_tier: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="open")    # open | pending | resolved | closed
    kind: Mapped[str] = mapped_column(String(16), default="case")     # case | incident (an outage parent)
    subject: Mapped[str | None] = mapped_column(Text)
    language: Mapped[str | None] = mapped_column(String(8))
    category: Mapped[str | None] = mapped_column(String(32))
    service: Mapped[str | None] = mapped_column(String(32))
    severity: Mapped[str | None] = mapped_column(String(16))
    blast_estimate: Mapped[int | None] = mapped_column(Integer)
    blast_tier: Mapped[str] = mapped_column(String(16), default="none")
    identifiers: Mapped[dict] = mapped_column(JSON, default=dict)
    sla_due: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id"))
    slack_channel: Mapped[str | None] = mapped_column(String(64))
    slack_thread_ts: Mapped[str | None] = mapped_column(String(32))
    agent_post_ts: Mapped[str | None] = mapped_column(String(32))
    features: Mapped[dict] = mapped_column(JSON, default=dict)       # outage-clustering signature
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class MessageRow(Base):
    """A normalized, triaged message and the case it landed in."""

    __tablename__ = "messages"
    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    intake_id: Mapped[int | None] = mapped_column(ForeignKey("intake.id"), unique=True)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id"), index=True)
    source: Mapped[str] = mapped_column(String(16))
    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    sender: Mapped[str | None] = mapped_column(String(320), index=True)
    sender_name: Mapped[str | None] = mapped_column(String(255))
    subject: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text, default="")
    quoted: Mapped[str] = mapped_column(Text, default="")
    slack_channel: Mapped[str | None] = mapped_column(String(64))
    slack_ts: Mapped[str | None] = mapped_column(String(32))
    slack_thread_ts: Mapped[str | None] = mapped_column(String(32))
    disposition: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(16))                   # created | threaded | duplicate | ignored
    language: Mapped[str | None] = mapped_column(String(8))
    category: Mapped[str | None] = mapped_column(String(32))
    service: Mapped[str | None] = mapped_column(String(32))
    severity: Mapped[str | None] = mapped_column(String(16))
    blast_estimate: Mapped[int | None] = mapped_column(Integer)
    blast_tier: Mapped[str | None] = mapped_column(String(16))
    identifiers: Mapped[dict] = mapped_column(JSON, default=dict)
    confidence: Mapped[dict] = mapped_column(JSON, default=dict)
    trail: Mapped[list] = mapped_column(JSON, default=list)
    model_versions: Mapped[dict] = mapped_column(JSON, default=dict)
    flags: Mapped[list] = mapped_column(JSON, default=list)
    edited_text: Mapped[str | None] = mapped_column(Text)
    deleted: Mapped[bool] = mapped_column(default=False)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (Index("ix_messages_slack", "slack_channel", "slack_ts"),
                      Index("ix_messages_hash_sender", "content_hash", "sender"))


class ThreadKey(Base):
    """A unique key that names a thread (a Message-ID, a Slack thread): two workers cannot both claim one."""

    __tablename__ = "thread_keys"
    key: Mapped[str] = mapped_column(String(1024), primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)


class CaseEvent(Base):
    """The audit trail of a case: every change and who or what made it."""

    __tablename__ = "case_events"
    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))                   # "bot", "slack:U123", "admin:cli"
    kind: Mapped[str] = mapped_column(String(32))                     # created, threaded, relabelled, ...
    detail: Mapped[dict] = mapped_column(JSON, default=dict)


class Feedback(Base):
    """An agent's correction of a label, kept for retraining."""

    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"))
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id"))
    actor: Mapped[str] = mapped_column(String(128))
    field: Mapped[str] = mapped_column(String(32))                    # category | service | severity
    old_value: Mapped[str | None] = mapped_column(String(64))
    new_value: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))
    language: Mapped[str | None] = mapped_column(String(8))
    subject: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    used_in_model: Mapped[str | None] = mapped_column(String(64))


class Outbox(Base):
    """Outgoing mail waiting for the relay: a relay that is down delays mail, it does not lose it."""

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id"))
    kind: Mapped[str] = mapped_column(String(32))                     # ack | reply
    recipient: Mapped[str] = mapped_column(String(320))
    message_id: Mapped[str] = mapped_column(String(998), unique=True)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    dedupe_key: Mapped[str | None] = mapped_column(String(512), unique=True)
    state: Mapped[str] = mapped_column(String(16), default="queued")  # queued | sent | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class State(Base):
    """Small named values a process must remember across restarts (IMAP UIDVALIDITY and last UID, ...)."""

    __tablename__ = "state"
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


__all__ = ["Base", "Intake", "Case", "MessageRow", "ThreadKey", "CaseEvent", "Feedback", "Outbox", "State",
           "UniqueConstraint", "utcnow"]


class Audit(Base):
    """The data-protection audit trail: every admin command and every agent's access, who and when."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))                   # "admin:alice", "slack:U123"
    action: Mapped[str] = mapped_column(String(32))                   # purge, export, forget, status, view_case, ...
    target: Mapped[str | None] = mapped_column(String(255))           # CASE-000123, a customer, contact:<hash>
    detail: Mapped[dict] = mapped_column(JSON, default=dict)


__all__.append("Audit")
