"""The outbox sender: hands queued mail to the configured SMTP relay, retrying until it takes it.

A relay that is down (refuses the connection, drops it, answers 421) delays mail, never loses it: the
rows stay queued and are tried again with a growing delay, and such tries do not count as attempts.
A temporary refusal of one message (4xx) is tried again up to `max_attempts`; a permanent one (5xx)
parks the row as failed at once, with the relay's answer in last_error.

Several senders may run against one database: a row is claimed by moving its not_before past a lease
in one UPDATE that only one of them can win. A sender that dies after the relay took a message but
before marking it sent leaves it to be sent again once the lease runs out (the same Message-ID, which
mail clients recognise): SMTP has no exactly-once.
"""
from __future__ import annotations

import logging
import smtplib
import socket
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from triagebot.db.engine import open_db
from triagebot.db.tables import Outbox, utcnow
from triagebot.settings import Settings

log = logging.getLogger(__name__)

QUEUED, SENT, FAILED = "queued", "sent", "failed"
# Auto-replies leave with a null envelope sender (RFC 3834 §3.3, RFC 5321 §4.5.5): their bounces go nowhere
NULL_SENDER_KINDS = {"ack"}


class RelayDown(Exception):
    """The relay as a whole is unreachable or refuses service; no message is to blame."""


@dataclass
class Report:
    """What one pass did."""

    sent: list[int] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    relay_down: bool = False


class Sender:
    """Sends due outbox rows through the relay."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], *, batch: int = 20,
                 lease_seconds: int = 300, max_attempts: int = 10, base_delay: float = 30.0,
                 max_delay: float = 3600.0, timeout: float = 30.0, name: str | None = None) -> None:
        if not settings.relay_host:
            raise ValueError("no relay configured: set TRIAGEBOT_RELAY_HOST (and TRIAGEBOT_RELAY_PORT)")
        self.settings, self.sessions = settings, sessions
        self.batch, self.lease, self.max_attempts = batch, lease_seconds, max_attempts
        self.base_delay, self.max_delay, self.timeout = base_delay, max_delay, timeout
        self.name = name or socket.gethostname()
        self.down_delay = base_delay      # grows while the relay stays down, resets when it takes mail

    # -- the queue ------------------------------------------------------------------------------------
    def claim(self) -> list[Outbox]:
        """Claim up to `batch` due rows; each one only if no other sender claimed it first."""
        now = utcnow()
        with self.sessions() as s:
            ids = list(s.scalars(select(Outbox.id).where(Outbox.state == QUEUED, Outbox.not_before <= now)
                                 .order_by(Outbox.id).limit(self.batch)))
        claimed = []
        for row_id in ids:
            with self.sessions() as s, s.begin():
                won = s.execute(update(Outbox).where(Outbox.id == row_id, Outbox.state == QUEUED,
                                                     Outbox.not_before <= now)
                                .values(not_before=now + timedelta(seconds=self.lease),
                                        attempts=Outbox.attempts + 1)).rowcount
                if won:
                    row = s.get(Outbox, row_id)
                    s.expunge(row)
                    claimed.append(row)
        return claimed

    def _finish(self, row_id: int, **values) -> None:
        with self.sessions() as s, s.begin():
            s.execute(update(Outbox).where(Outbox.id == row_id).values(**values))

    def _retry(self, row: Outbox, error: str, counts: bool) -> str:
        """Queue again after a delay; after max_attempts counted tries, park as failed."""
        if counts and row.attempts >= self.max_attempts:
            self._finish(row.id, state=FAILED, last_error=error[:2000])
            return FAILED
        delay = (min(self.max_delay, self.base_delay * 2 ** max(0, row.attempts - 1)) if counts
                 else self.down_delay)
        values = {"not_before": utcnow() + timedelta(seconds=delay), "last_error": error[:2000]}
        if not counts:
            values["attempts"] = row.attempts - 1   # the relay being down is not this message's attempt
        self._finish(row.id, **values)
        return QUEUED

    # -- one pass -------------------------------------------------------------------------------------
    def send_due(self) -> Report:
        """Claim the due rows and hand them to the relay over one connection."""
        report = Report()
        rows = self.claim()
        if not rows:
            return report
        try:
            conn = self._connect()
        except RelayDown as e:
            return self._relay_down(rows, str(e), report)
        try:
            for i, row in enumerate(rows):
                try:
                    outcome = self._send_one(conn, row)
                except RelayDown as e:
                    return self._relay_down(rows[i:], str(e), report)
                getattr(report, outcome).append(row.id)
        finally:
            try:
                conn.quit()
            except (smtplib.SMTPException, OSError):
                conn.close()
        self.down_delay = self.base_delay
        return report

    def _connect(self) -> smtplib.SMTP:
        try:
            conn = smtplib.SMTP(self.settings.relay_host, self.settings.relay_port, timeout=self.timeout)
            code, msg = conn.ehlo()
            if code >= 400:
                conn.close()
                raise RelayDown(f"EHLO answered {code} {msg!r}")
            return conn
        except (OSError, smtplib.SMTPException) as e:
            raise RelayDown(f"{type(e).__name__}: {e}") from None

    def _send_one(self, conn: smtplib.SMTP, row: Outbox) -> str:
        envelope_from = "" if row.kind in NULL_SENDER_KINDS else self.settings.support_address
        try:
            conn.sendmail(envelope_from, [row.recipient], row.raw)
        except smtplib.SMTPRecipientsRefused as e:
            code, msg = next(iter(e.recipients.values()))
            return self._refused(conn, row, code, msg)
        except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as e:
            return self._refused(conn, row, e.smtp_code, e.smtp_error)
        except (smtplib.SMTPServerDisconnected, OSError) as e:
            raise RelayDown(f"{type(e).__name__}: {e}") from None
        except smtplib.SMTPResponseException as e:
            return self._refused(conn, row, e.smtp_code, e.smtp_error)
        self._finish(row.id, state=SENT, sent_at=utcnow(), last_error=None)
        log.info("outbox %s (%s for case %s) handed to the relay", row.id, row.kind, row.case_id)
        return "sent"

    def _refused(self, conn: smtplib.SMTP, row: Outbox, code: int, msg: bytes | str) -> str:
        text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
        error = f"{code} {text}"
        try:
            conn.rset()  # the next message starts from a clean transaction
        except (smtplib.SMTPException, OSError):
            raise RelayDown(f"connection lost after {error}") from None
        if code == 421:  # the relay is closing the session (RFC 5321 §3.8): it, not the message, is the problem
            raise RelayDown(error)
        if 500 <= code < 600:
            self._finish(row.id, state=FAILED, last_error=error[:2000])
            log.error("outbox %s refused permanently by the relay: %s", row.id, error)
            return "failed"
        state = self._retry(row, error, counts=True)
        log.warning("outbox %s refused for now by the relay: %s (%s)", row.id, error, state)
        return "failed" if state == FAILED else "retry"

    def _relay_down(self, rows: list[Outbox], error: str, report: Report) -> Report:
        for row in rows:
            self._retry(row, error, counts=False)
            report.retry.append(row.id)
        report.relay_down = True
        log.error("relay %s:%s unavailable (%s); %d messages wait %.0fs", self.settings.relay_host,
                  self.settings.relay_port, error, len(rows), self.down_delay)
        self.down_delay = min(self.max_delay, self.down_delay * 2)
        return report

    # -- the loop -------------------------------------------------------------------------------------
    def run(self, stop: threading.Event, idle_seconds: float = 1.0) -> None:
        """Send until stopped; sleep when nothing is due."""
        while not stop.is_set():
            try:
                report = self.send_due()
            except Exception:  # noqa: BLE001 - the database may be away for a moment: keep going
                log.error("sending pass failed", exc_info=True)
                report = Report(relay_down=True)
            if not (report.sent or report.failed) or report.relay_down:
                stop.wait(idle_seconds)


def serve(settings: Settings) -> None:
    """`triagebot sender`: send queued mail until SIGTERM/SIGINT; idle when no relay is configured."""
    import signal
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        if not settings.relay_host:
            # a Procfile process that exits stops its siblings under foreman/honcho: wait quietly instead
            log.warning("no relay configured (TRIAGEBOT_RELAY_HOST): no mail is queued or sent")
            while not stop.wait(3600):
                pass
            return
        _engine, sessions = open_db(settings.database_url)
        log.warning("sending queued mail through %s:%s", settings.relay_host, settings.relay_port)
        Sender(settings, sessions).run(stop)
    except KeyboardInterrupt:
        pass


def send_once(settings: Settings) -> Report:
    """One pass over the due outbox rows (for `triagebot sender --once` and tests)."""
    _engine, sessions = open_db(settings.database_url)
    return Sender(settings, sessions).send_due()
