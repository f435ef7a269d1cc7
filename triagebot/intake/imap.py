"""The IMAP poller (imapclient): takes new mail from support mailboxes into the intake table.

Like the SMTP listener it only takes in and stores. For each configured mailbox it remembers
UIDVALIDITY and the last UID it stored (the `state` table) and resumes after them (RFC 3501 §2.3.1.1:
UIDs only grow while UIDVALIDITY stays; a new UIDVALIDITY means the old UIDs mean nothing). Each
message is stored with the delivery key `imap:<mailbox>:<uidvalidity>:<uid>`, so fetching it again
after a crash, a dropped connection or a server restart stores nothing new; only once a message is
committed is it marked \\Seen or moved to the processed folder, so a failure leaves it for next time.

It waits with IDLE (RFC 2177) where the server has it and polls otherwise, one connection per
mailbox, reconnecting with exponential backoff. It never polls the Sent folder (SPECIAL-USE \\Sent,
RFC 6154, or a usual Sent name) and never takes in our own outgoing mail (Message-IDs in the outbox).
"""
from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

from imapclient import IMAPClient
from imapclient.exceptions import CapabilityError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triagebot.db import queue
from triagebot.db.engine import open_db
from triagebot.db.tables import Outbox, State
from triagebot.settings import Settings

log = logging.getLogger(__name__)

SEEN, DELETED = b"\\Seen", b"\\Deleted"
SENT_FLAG = b"\\Sent"
# Sent folders of servers without SPECIAL-USE (Gmail, Outlook, Thunderbird; sv and es clients too)
SENT_NAMES = {"sent", "sent items", "sent messages", "sent mail", "[gmail]/sent mail", "inbox.sent",
              "inbox/sent", "skickat", "skickade objekt", "skickade meddelanden", "enviados", "elementos enviados",
              "correo enviado", "mensajes enviados"}
FETCH_BATCH = 20                 # messages fetched per round trip: bounds memory for big attachments
IDLE_RESTART = 29 * 60           # RFC 2177: re-issue IDLE at least every 29 minutes
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 300.0
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]{1,900}>)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Account:
    """Where and as whom to log in."""

    host: str
    port: int
    user: str
    password: str
    ssl: bool = True
    timeout: float = 60.0


@dataclass(frozen=True)
class Cursor:
    """Where a mailbox was left: its UIDVALIDITY and the last UID stored."""

    uidvalidity: int
    last_uid: int


def delivery_key(mailbox: str, uidvalidity: int, uid: int) -> str:
    """The intake delivery key of one IMAP message: a re-fetch of it is a no-op."""
    return f"imap:{mailbox}:{uidvalidity}:{uid}"


def state_key(account: Account, mailbox: str) -> str:
    return f"imap:{account.user}@{account.host}:{account.port}/{mailbox}"


def is_sent_folder(name: str, flags: tuple[bytes, ...] = ()) -> bool:
    """A folder of sent mail: flagged \\Sent (RFC 6154) or named like one."""
    return SENT_FLAG in flags or name.strip().lower() in SENT_NAMES


def header_message_id(raw: bytes) -> str | None:
    """The Message-ID in the header section of raw mail, or None."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    m = _MESSAGE_ID.search(head)
    return m.group(1).decode("ascii", "replace") if m else None


class MailboxPoller:
    """Takes new messages from one mailbox: resume after the stored cursor, store, then mark or move."""

    def __init__(self, account: Account, sessions: sessionmaker[Session], mailbox: str = "INBOX", *,
                 processed_folder: str | None = None, use_idle: bool = True, poll_seconds: float = 30.0,
                 stop: threading.Event | None = None,
                 connect: Callable[[Account], IMAPClient] | None = None) -> None:
        if processed_folder and processed_folder == mailbox:
            raise ValueError(f"the processed folder {processed_folder!r} cannot be a polled mailbox")
        self.account, self.sessions, self.mailbox = account, sessions, mailbox
        self.processed_folder, self.use_idle, self.poll_seconds = processed_folder, use_idle, poll_seconds
        self.stop = stop or threading.Event()
        self._connect = connect or login
        self.mode: str | None = None       # "idle" or "poll", once connected
        self.skipped_sent = False

    # -- state ---------------------------------------------------------------------------------------
    def cursor(self) -> Cursor | None:
        """The stored cursor of this mailbox, or None before the first run."""
        with self.sessions() as s:
            row = s.get(State, state_key(self.account, self.mailbox))
            if row is None:
                return None
            v = json.loads(row.value)
            return Cursor(int(v["uidvalidity"]), int(v["last_uid"]))

    def save_cursor(self, cursor: Cursor) -> None:
        with self.sessions() as s, s.begin():
            s.merge(State(key=state_key(self.account, self.mailbox),
                          value=json.dumps({"uidvalidity": cursor.uidvalidity, "last_uid": cursor.last_uid})))

    # -- one pass ------------------------------------------------------------------------------------
    def check_folders(self, client: IMAPClient) -> bool:
        """False (and an error in the log) when this mailbox is a Sent folder, which we never read back in."""
        for flags, _delim, name in client.list_folders():
            if name.casefold() == self.mailbox.casefold() and is_sent_folder(name, tuple(flags)):
                log.error("IMAP mailbox %s is a Sent folder; it is not polled (our own mail must not come back in)",
                          self.mailbox)
                self.skipped_sent = True
                return False
        if is_sent_folder(self.mailbox):
            self.skipped_sent = True
            log.error("IMAP mailbox %s is named like a Sent folder; it is not polled", self.mailbox)
            return False
        if self.processed_folder and not client.folder_exists(self.processed_folder):
            client.create_folder(self.processed_folder)
        return True

    def sync(self, client: IMAPClient) -> int:
        """Store every message after the cursor, mark or move it, advance the cursor; returns how many were new."""
        info = client.select_folder(self.mailbox)
        uidvalidity = int(info[b"UIDVALIDITY"])
        cursor = self.cursor()
        if cursor is not None and cursor.uidvalidity != uidvalidity:
            # RFC 3501 §2.3.1.1: the mailbox was rebuilt and its old UIDs name nothing: a first run again
            log.warning("IMAP %s: UIDVALIDITY changed %s -> %s, reading the mailbox again", self.mailbox,
                        cursor.uidvalidity, uidvalidity)
            cursor = None
        if cursor is not None:
            # "n:*" always matches the last message even when its UID is below n (RFC 3501 §6.4.8)
            uids = sorted(u for u in client.search(["UID", f"{cursor.last_uid + 1}:*"]) if u > cursor.last_uid)
            return self.take(client, uidvalidity, uids, advance=True)
        # First run: what is not marked processed yet (in move mode, all that is still here). The cursor is
        # written only when the whole run is through; until then the flags are the record of progress.
        top = int(info[b"UIDNEXT"]) - 1 if b"UIDNEXT" in info else max(client.search(["ALL"]), default=0)
        criteria = ["NOT", "DELETED"] if self.processed_folder else ["UNSEEN", "NOT", "DELETED"]
        uids = sorted(client.search(criteria))
        new = self.take(client, uidvalidity, uids, advance=False)
        self.save_cursor(Cursor(uidvalidity, max([top, *uids])))
        return new

    def take(self, client: IMAPClient, uidvalidity: int, uids: list[int], advance: bool) -> int:
        """Fetch, store and mark the given messages in UID order; with advance, move the cursor as they are done."""
        new = 0
        for start in range(0, len(uids), FETCH_BATCH):
            batch = uids[start:start + FETCH_BATCH]
            fetched = client.fetch(batch, ["BODY.PEEK[]"])   # PEEK: fetching must not set \Seen by itself
            done: list[int] = []
            try:
                for uid in batch:
                    data = fetched.get(uid)
                    if data is not None:   # None: expunged between SEARCH and FETCH
                        new += self.store(uid, uidvalidity, bytes(data[b"BODY[]"]))
                    done.append(uid)
            finally:
                # what is committed is marked and remembered, even when a later message of the batch failed
                if done:
                    self.mark(client, done)
                    if advance:
                        self.save_cursor(Cursor(uidvalidity, max(done)))
        return new

    def store(self, uid: int, uidvalidity: int, raw: bytes) -> int:
        """Commit one message to the intake table; 1 if new, 0 if stored before or our own mail."""
        mid = header_message_id(raw)
        if mid and self.is_own(mid):
            log.info("IMAP %s uid %s is our own outgoing mail; not taken in", self.mailbox, uid)
            return 0
        intake_id = queue.enqueue(self.sessions, "email", raw, origin=f"imap:{self.account.host}/{self.mailbox}",
                                  delivery_key=delivery_key(self.mailbox, uidvalidity, uid))
        if intake_id is None:
            log.info("IMAP %s uid %s was stored before", self.mailbox, uid)
            return 0
        return 1

    def is_own(self, message_id: str) -> bool:
        with self.sessions() as s:
            return s.scalar(select(Outbox.id).where(Outbox.message_id == message_id).limit(1)) is not None

    def mark(self, client: IMAPClient, uids: list[int]) -> None:
        """Mark stored messages processed: move them to the processed folder, or flag them \\Seen."""
        if not self.processed_folder:
            client.add_flags(uids, [SEEN], silent=True)
            return
        try:
            client.move(uids, self.processed_folder)      # RFC 6851
        except CapabilityError:
            client.copy(uids, self.processed_folder)
            client.add_flags(uids, [SEEN, DELETED], silent=True)
            if client.has_capability("UIDPLUS"):
                client.uid_expunge(uids)                   # only ours, never other \Deleted mail (RFC 4315)

    def wait(self, client: IMAPClient) -> None:
        """Until new mail may be there: IDLE when the server has it, else sleep the poll interval."""
        if not (self.use_idle and client.has_capability("IDLE")):
            self.mode = "poll"
            self.stop.wait(self.poll_seconds)
            return
        client.idle()
        self.mode = "idle"
        try:
            end = time.monotonic() + min(self.poll_seconds, IDLE_RESTART)
            while not self.stop.is_set() and time.monotonic() < end:
                responses = client.idle_check(timeout=1)
                if any(len(r) > 1 and r[1] in (b"EXISTS", b"RECENT") for r in responses):
                    return
        finally:
            client.idle_done()

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> None:
        """Connect, sync, wait, sync ... until stopped; reconnect with backoff after any failure."""
        delay = BACKOFF_FIRST
        while not self.stop.is_set():
            client = None
            try:
                client = self._connect(self.account)
                if not self.check_folders(client):
                    return
                delay = BACKOFF_FIRST
                while not self.stop.is_set():
                    n = self.sync(client)
                    if n:
                        log.info("IMAP %s: %d new messages stored", self.mailbox, n)
                    self.wait(client)
            except Exception as e:  # noqa: BLE001 - server gone, connection dropped, database down: retry later
                log.error("IMAP %s: %s: %s; retrying in %.0fs", self.mailbox, type(e).__name__, e, delay)
                self.stop.wait(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, BACKOFF_MAX)
            finally:
                if client is not None:
                    _close(client)


def login(account: Account) -> IMAPClient:
    """A logged-in IMAPClient for the account."""
    client = IMAPClient(account.host, port=account.port, ssl=account.ssl, timeout=account.timeout)
    try:
        client.login(account.user, account.password)
    except Exception:
        _close(client)
        raise
    return client


def _close(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:  # noqa: BLE001 - the connection may already be gone
        try:
            client.shutdown()
        except Exception:  # noqa: BLE001
            pass


def account_from(settings: Settings) -> Account:
    """The IMAP account of the settings; ValueError when it is not configured."""
    if not (settings.imap_host and settings.imap_user and settings.imap_password is not None):
        raise ValueError("IMAP is not configured: set TRIAGEBOT_IMAP_HOST, TRIAGEBOT_IMAP_USER and "
                         "TRIAGEBOT_IMAP_PASSWORD")
    return Account(settings.imap_host, settings.imap_port, settings.imap_user, settings.imap_password,
                   ssl=settings.imap_ssl)


def pollers(settings: Settings, stop: threading.Event, processed_folder: str | None = None,
            use_idle: bool = True) -> list[MailboxPoller]:
    """One poller per configured mailbox, sharing a stop event."""
    account = account_from(settings)
    _engine, sessions = open_db(settings.database_url)
    folder = processed_folder or settings.imap_processed_folder
    return [MailboxPoller(account, sessions, mb, processed_folder=folder, use_idle=use_idle,
                          poll_seconds=settings.imap_poll_seconds, stop=stop)
            for mb in settings.imap_mailboxes]


def poll_once(settings: Settings, processed_folder: str | None = None) -> int:
    """Sync every configured mailbox once and return how many new messages were stored."""
    total = 0
    for p in pollers(settings, threading.Event(), processed_folder):
        client = login(p.account)
        try:
            if p.check_folders(client):
                total += p.sync(client)
        finally:
            _close(client)
    return total


def serve(settings: Settings, processed_folder: str | None = None) -> None:
    """Run a poller thread per mailbox until SIGTERM/SIGINT; idle when IMAP is not configured."""
    import signal
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        account_from(settings)
    except ValueError as e:
        # a Procfile process that exits stops its siblings under foreman/honcho: wait quietly instead
        log.warning("%s; the IMAP poller has nothing to do", e)
        _wait(stop)
        return
    threads = [threading.Thread(target=p.run, name=f"imap-{p.mailbox}", daemon=True)
               for p in pollers(settings, stop, processed_folder)]
    log.warning("IMAP poller for %s@%s:%s, mailboxes %s", settings.imap_user, settings.imap_host,
                settings.imap_port, ", ".join(settings.imap_mailboxes))
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.5)
    except KeyboardInterrupt:
        stop.set()
    stop.set()
    for t in threads:
        t.join(30)


def _wait(stop: threading.Event) -> None:
    try:
        while not stop.wait(3600):
            pass
    except KeyboardInterrupt:
        pass
