"""The IMAP poller against a real dovecot (Debian's dovecot-imapd) on a free loopback port."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from imapclient import IMAPClient
from sqlalchemy import select

from triagebot.cli import main
from triagebot.db.engine import open_db
from triagebot.db.tables import Intake, Outbox, State
from triagebot.intake import imap
from triagebot.intake.imap import Account, MailboxPoller

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
USER, PASSWORD = "support", "s3cret"
DEADLINE = 60.0   # seconds a wait may take before the test fails; a bound, not a timing assertion


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dovecot:
    """A throwaway dovecot: its own config, passwd-file user and maildir in a temporary folder."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.proc = root, free_port(), None
        for d in ("run", "state", "mail", "home"):
            (root / d).mkdir()
        if os.geteuid() == 0:
            # dovecot refuses root for logins and mail users: the mail belongs to nobody
            nobody = pwd.getpwnam("nobody")
            uid, gid, daemon_users = nobody.pw_uid, nobody.pw_gid, ""
            for d in ("mail", "home"):
                os.chown(root / d, uid, gid)
        else:
            uid, gid = os.getuid(), os.getgid()
            me = pwd.getpwuid(uid).pw_name
            daemon_users = f"default_internal_user = {me}\ndefault_login_user = {me}\n"
        (root / "users").write_text(f"{USER}:{{PLAIN}}{PASSWORD}:{uid}:{gid}::{root / 'home'}::\n")
        self.conf = root / "dovecot.conf"
        self.conf.write_text(f"""\
protocols = imap
listen = 127.0.0.1
base_dir = {root / 'run'}
state_dir = {root / 'state'}
log_path = {root / 'dovecot.log'}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{root / 'mail'}/%u
first_valid_uid = {min(uid, 500) or 1}
first_valid_gid = {min(gid, 500) or 1}
{daemon_users}passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root / 'users'}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root / 'users'}
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Sent {{
    special_use = \\Sent
    auto = create
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""")

    @property
    def account(self) -> Account:
        return Account("127.0.0.1", self.port, USER, PASSWORD, ssl=False, timeout=10)

    def start(self) -> None:
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"dovecot exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                self.client().logout()
                return
            except Exception:  # noqa: BLE001 - still starting
                time.sleep(0.1)
        pytest.fail(f"dovecot did not accept a login within {DEADLINE}s: {self.log()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None

    def log(self) -> str:
        p = self.root / "dovecot.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def client(self) -> IMAPClient:
        c = IMAPClient("127.0.0.1", port=self.port, ssl=False, timeout=10)
        c.login(USER, PASSWORD)
        return c

    def append(self, n: int, folder: str = "INBOX", tag: str = "m", message_id: str | None = None) -> list[str]:
        """Append n messages with fresh Message-IDs; returns the ids."""
        ids = []
        with self.client() as c:
            for i in range(n):
                mid = message_id or f"<{tag}-{i}-{uuid.uuid4().hex[:8]}@customer.example>"
                c.append(folder, mail(mid, f"{tag} {i}"))
                ids.append(mid)
        return ids

    def flags(self, folder: str = "INBOX") -> dict[str, tuple[bytes, ...]]:
        """Message-ID -> flags of every message in a folder."""
        with self.client() as c:
            c.select_folder(folder, readonly=True)
            data = c.fetch(c.search(["ALL"]), ["FLAGS", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
        return {imap.header_message_id(d[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"]): d[b"FLAGS"] for d in data.values()}


def mail(message_id: str, subject: str) -> bytes:
    return (f"From: Ana <ana@customer.example>\r\nTo: support@support.example.net\r\nSubject: {subject}\r\n"
            f"Message-ID: {message_id}\r\n\r\nSIM 8946000000000000001 has no data since 10:00.\r\n").encode()


@pytest.fixture
def dovecot():
    if not os.path.exists(DOVECOT):
        pytest.skip("dovecot is not installed (Debian's dovecot-imapd; scripts/services.sh installs it)")
    # not pytest's tmp_path: dovecot's unprivileged processes must be able to reach the folder
    root = Path(tempfile.mkdtemp(prefix="triagebot-dovecot-"))
    root.chmod(0o755)
    server = Dovecot(root)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sessions(tmp_path):
    _engine, sessions = open_db(f"sqlite:///{tmp_path / 'triagebot.db'}")
    return sessions


def stored(sessions) -> list[Intake]:
    with sessions() as s:
        return list(s.scalars(select(Intake).order_by(Intake.id)))


def stored_ids(sessions) -> list[str]:
    return [imap.header_message_id(r.raw) for r in stored(sessions)]


def sync_once(poller: MailboxPoller) -> int:
    client = imap.login(poller.account)
    try:
        assert poller.check_folders(client)
        return poller.sync(client)
    finally:
        client.logout()


def wait_for(predicate, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"gave up waiting for {what}")


class Running:
    """A poller's run() loop in a thread, stopped at the end."""

    def __init__(self, poller: MailboxPoller) -> None:
        self.poller = poller
        self.thread = threading.Thread(target=poller.run, daemon=True)

    def __enter__(self) -> MailboxPoller:
        self.thread.start()
        return self.poller

    def __exit__(self, *exc) -> None:
        self.poller.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def test_new_mail_is_stored_with_delivery_keys_then_marked_seen(dovecot, sessions):
    ids = dovecot.append(3)
    poller = MailboxPoller(dovecot.account, sessions)
    assert sync_once(poller) == 3
    rows = stored(sessions)
    assert [imap.header_message_id(r.raw) for r in rows] == ids
    with dovecot.client() as c:
        uidvalidity = c.select_folder("INBOX")[b"UIDVALIDITY"]
    assert [r.delivery_key for r in rows] == [f"imap:INBOX:{uidvalidity}:{uid}" for uid in (1, 2, 3)]
    assert all(r.channel == "email" and r.state == "queued" for r in rows)
    assert all(imap.SEEN in f for f in dovecot.flags().values())
    assert poller.cursor() == imap.Cursor(uidvalidity, 3)
    with sessions() as s:
        state = s.get(State, imap.state_key(dovecot.account, "INBOX"))
        assert json.loads(state.value) == {"uidvalidity": uidvalidity, "last_uid": 3}


def test_each_message_is_marked_only_after_it_is_stored(dovecot, sessions):
    dovecot.append(4)
    events: list[tuple[str, int]] = []

    class Recording(MailboxPoller):
        def store(self, uid, uidvalidity, raw):
            n = super().store(uid, uidvalidity, raw)
            events.append(("stored", uid))
            return n

        def mark(self, client, uids):
            # at this point the rows are committed: another connection sees them
            assert {r.delivery_key.rsplit(":", 1)[1] for r in stored(sessions)} >= {str(u) for u in uids}
            events.extend(("marked", u) for u in uids)
            super().mark(client, uids)

    sync_once(Recording(dovecot.account, sessions))
    for uid in (1, 2, 3, 4):
        assert events.index(("stored", uid)) < events.index(("marked", uid))


def test_storage_failure_leaves_the_mail_unmarked_for_the_next_run(dovecot, sessions, tmp_path):
    ids = dovecot.append(2)
    engine, _ = open_db(f"sqlite:///{tmp_path / 'triagebot.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE intake RENAME TO intake_gone")
    poller = MailboxPoller(dovecot.account, sessions)
    with pytest.raises(Exception):
        sync_once(poller)
    assert all(imap.SEEN not in f for f in dovecot.flags().values())
    assert poller.cursor() is None
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE intake_gone RENAME TO intake")
    assert sync_once(poller) == 2
    assert stored_ids(sessions) == ids
    assert all(imap.SEEN in f for f in dovecot.flags().values())


def test_resumes_after_the_stored_uid_even_for_mail_marked_unread_again(dovecot, sessions):
    first = dovecot.append(2, tag="first")
    assert sync_once(MailboxPoller(dovecot.account, sessions)) == 2
    with dovecot.client() as c:          # an agent marks the old mail unread in their mail client
        c.select_folder("INBOX")
        c.remove_flags(c.search(["ALL"]), [imap.SEEN])
    second = dovecot.append(2, tag="second")
    restarted = MailboxPoller(dovecot.account, sessions)    # a new process: only the state table remembers
    assert restarted.cursor().last_uid == 2
    assert sync_once(restarted) == 2
    assert stored_ids(sessions) == first + second
    assert restarted.cursor().last_uid == 4


def test_a_refetch_stores_nothing_twice(dovecot, sessions):
    dovecot.append(3)
    poller = MailboxPoller(dovecot.account, sessions)
    sync_once(poller)
    # forget the cursor and the flags, as after a crash between storing and marking
    with sessions() as s, s.begin():
        s.delete(s.get(State, imap.state_key(dovecot.account, "INBOX")))
    with dovecot.client() as c:
        c.select_folder("INBOX")
        c.remove_flags(c.search(["ALL"]), [imap.SEEN])
    assert sync_once(poller) == 0
    assert len(stored(sessions)) == 3
    assert all(imap.SEEN in f for f in dovecot.flags().values())


def test_a_new_uidvalidity_reads_the_rebuilt_mailbox(dovecot, sessions):
    with dovecot.client() as c:
        c.create_folder("Support")
    dovecot.append(2, folder="Support", tag="old")
    poller = MailboxPoller(dovecot.account, sessions, "Support")
    sync_once(poller)
    before = poller.cursor()
    with dovecot.client() as c:
        c.delete_folder("Support")
        c.create_folder("Support")
    new = dovecot.append(1, folder="Support", tag="new")
    with dovecot.client() as c:
        assert c.select_folder("Support")[b"UIDVALIDITY"] != before.uidvalidity
    assert sync_once(poller) == 1        # UID 1 again, but of a new UIDVALIDITY: a new message
    assert stored_ids(sessions)[-1] == new[0]
    assert poller.cursor().uidvalidity != before.uidvalidity


def test_move_mode_moves_stored_mail_to_the_processed_folder(dovecot, sessions):
    ids = dovecot.append(3)
    poller = MailboxPoller(dovecot.account, sessions, processed_folder="Processed")
    assert sync_once(poller) == 3
    assert dovecot.flags("INBOX") == {}
    assert set(dovecot.flags("Processed")) == set(ids)
    assert stored_ids(sessions) == ids
    more = dovecot.append(1)
    assert sync_once(poller) == 1
    assert stored_ids(sessions) == ids + more


def test_idle_wakes_the_poller_for_new_mail(dovecot, sessions):
    poller = MailboxPoller(dovecot.account, sessions, poll_seconds=3600)   # only IDLE can bring the mail in
    with Running(poller):
        wait_for(lambda: poller.mode == "idle", "the poller to IDLE")
        ids = dovecot.append(2)
        wait_for(lambda: len(stored(sessions)) == 2, "IDLE to bring in two messages")
    assert stored_ids(sessions) == ids


def test_polls_when_idle_is_not_used(dovecot, sessions):
    poller = MailboxPoller(dovecot.account, sessions, use_idle=False, poll_seconds=0.2)
    with Running(poller):
        wait_for(lambda: poller.mode == "poll", "the first poll")
        ids = dovecot.append(2)
        wait_for(lambda: len(stored(sessions)) == 2, "a poll to bring in two messages")
    assert stored_ids(sessions) == ids


def test_server_restart_mid_run_loses_nothing_and_stores_nothing_twice(dovecot, sessions, monkeypatch):
    monkeypatch.setattr(imap, "BACKOFF_FIRST", 0.2)
    poller = MailboxPoller(dovecot.account, sessions, poll_seconds=3600)
    ids = dovecot.append(3, tag="before")
    with Running(poller):
        wait_for(lambda: len(stored(sessions)) == 3, "the first three messages")
        dovecot.stop()
        dovecot.start()                  # same port, same maildir; the poller reconnects on its own
        ids += dovecot.append(3, tag="after")
        wait_for(lambda: len(stored(sessions)) == 6, "the messages sent after the restart")
    assert sorted(stored_ids(sessions)) == sorted(ids)
    assert len({r.delivery_key for r in stored(sessions)}) == 6
    assert all(imap.SEEN in f for f in dovecot.flags().values())


def test_a_connection_dropped_between_storing_and_marking_stores_each_message_once(dovecot, sessions, monkeypatch):
    monkeypatch.setattr(imap, "BACKOFF_FIRST", 0.2)
    drops = []

    class Dropping(MailboxPoller):
        def mark(self, client, uids):
            if not drops:            # stored and committed, then the connection dies before \Seen is set
                drops.append(uids)
                client.shutdown()
                raise ConnectionResetError("dropped")
            super().mark(client, uids)

    ids = dovecot.append(3)
    poller = Dropping(dovecot.account, sessions, poll_seconds=3600)
    with Running(poller):
        wait_for(lambda: drops and all(imap.SEEN in f for f in dovecot.flags().values()),
                 "the poller to reconnect and mark the mail")
    assert drops == [[1, 2, 3]]
    assert stored_ids(sessions) == ids


def test_the_sent_folder_is_never_polled(dovecot, sessions):
    dovecot.append(2, folder="Sent", tag="ours")
    poller = MailboxPoller(dovecot.account, sessions, "Sent", poll_seconds=0.1)
    with Running(poller):
        wait_for(lambda: not poller.stop.is_set() and poller.skipped_sent, "the poller to refuse Sent")
    assert poller.mode is None            # it never selected the folder, let alone fetched
    assert stored(sessions) == []
    assert imap.is_sent_folder("Skickat") and imap.is_sent_folder("Elementos enviados")
    assert not imap.is_sent_folder("INBOX")


def test_our_own_acknowledgements_are_not_taken_back_in(dovecot, sessions):
    ack_id = "<ack.1.abc@support.example.net>"
    with sessions() as s, s.begin():
        s.add(Outbox(kind="ack", recipient="ana@customer.example", message_id=ack_id, raw=b"x"))
    dovecot.append(1, message_id=ack_id)
    customer = dovecot.append(1, tag="customer")
    assert sync_once(MailboxPoller(dovecot.account, sessions)) == 1
    assert stored_ids(sessions) == customer
    assert all(imap.SEEN in f for f in dovecot.flags().values())


def test_triagebot_imap_once_uses_the_settings(dovecot, tmp_path, monkeypatch, capsys):
    ids = dovecot.append(2)
    dovecot.append(1, folder="Sent", tag="ours")
    url = f"sqlite:///{tmp_path / 'triagebot.db'}"
    for k, v in {"DATABASE_URL": url, "IMAP_HOST": "127.0.0.1", "IMAP_PORT": str(dovecot.port),
                 "IMAP_SSL": "false", "IMAP_USER": USER, "IMAP_PASSWORD": PASSWORD,
                 "IMAP_MAILBOXES": "INBOX,Sent"}.items():
        monkeypatch.setenv(f"TRIAGEBOT_{k}", v)
    assert main(["imap", "--once"]) == 0
    assert "stored 2" in capsys.readouterr().out
    _e, sessions = open_db(url)
    assert stored_ids(sessions) == ids
