"""`triagebot run`: the whole bot on one machine, the Procfile's processes as children.

Always the SMTP listener, the web process and one worker; the IMAP poller when an IMAP host is set
(TRIAGEBOT_IMAP_HOST) and the outgoing-mail sender when a relay is (TRIAGEBOT_RELAY_HOST). Each child gets
these settings in its environment, so it runs with exactly them, those from a TOML file included.

With --demo it also feeds the bundled sample messages through the real listeners (mail by SMTP,
Slack events as signed HTTP requests) and prints the cases as the worker creates them.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import fields, replace
from pathlib import Path

from sqlalchemy import select

from triagebot.settings import ROOT, Settings

SAMPLES = ROOT / "samples"


def _wait_port(host: str, port: int, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.2)
    return False


def _signed_post(url: str, secret: str, body: bytes) -> int:
    ts = str(int(time.time()))
    sig = "v0=" + hmac.new(secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status


def feed_samples(settings: Settings, secret: str) -> None:
    """Send every bundled sample through its real channel, in name order."""
    for path in sorted(SAMPLES.iterdir()):
        if path.suffix == ".eml":
            with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=10) as smtp:
                smtp.sendmail("demo@localhost", [settings.support_address], path.read_bytes())
            print(f"  sent   {path.name} by SMTP", flush=True)
        elif path.suffix == ".json":
            payload = json.loads(path.read_text())
            if payload.get("type") != "event_callback":
                payload = {"type": "event_callback", "team_id": "T0DEMO", "event_id": f"Ev{path.stem}",
                           "event": payload}
            status = _signed_post(f"http://{settings.web_host}:{settings.web_port}/slack/events", secret,
                                  json.dumps(payload).encode())
            print(f"  posted {path.name} to /slack/events ({status})", flush=True)
        time.sleep(0.3)


def show_progress(settings: Settings, seen: set[int]) -> None:
    """Print the messages the worker has stored since the last call."""
    from triagebot.db.engine import open_db
    from triagebot.db.tables import Case, MessageRow
    _engine, sessions = open_db(settings.database_url)
    with sessions() as s:
        for m in s.scalars(select(MessageRow).where(MessageRow.id.not_in(seen or {0})).order_by(MessageRow.id)):
            seen.add(m.id)
            case = s.get(Case, m.case_id) if m.case_id else None
            where = f"{m.action:8} {case.reference if case else '-':12}"
            labels = (f"{m.language} {m.category}/{m.service}/{m.severity} blast={m.blast_tier}/{m.blast_estimate}"
                      if m.disposition == "case" else f"{m.language} {m.disposition}")
            print(f"  case   {where} {labels}  «{(m.subject or m.text)[:50]}»", flush=True)


def commands(settings: Settings) -> dict[str, list[str]]:
    """The processes to start, as in the Procfile: IMAP only with an IMAP host, the sender only with a relay."""
    cmds = {"smtp": ["smtp"], "web": ["web"], "worker": ["worker"]}
    if settings.imap_host:
        cmds["imap"] = ["imap"]
    if settings.relay_host:
        cmds["sender"] = ["sender"]
    return cmds


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def child_env(settings: Settings, base: dict[str, str]) -> dict[str, str]:
    """The environment of a child process: the base one with every setting as the variable Settings.load reads."""
    env = dict(base)
    env.pop("TRIAGEBOT_CONFIG", None)   # every value is in the environment now, TOML ones included
    for f in fields(Settings):
        # SLACK_* are read after TRIAGEBOT_SLACK_* and win (settings.py): set the name that wins
        key = f.name.upper() if f.name.startswith("slack_") else f"TRIAGEBOT_{f.name.upper()}"
        value = getattr(settings, f.name)
        if value is None:
            env.pop(key, None)
        else:
            env[key] = _env_value(value)
    return env


def run(settings: Settings, demo: bool = False) -> int:
    """Start the Procfile's processes the settings call for as children; stop them all on Ctrl-C or SIGTERM."""
    # the demo signs its Slack events: with the configured secret, else with one made up for this run
    secret = settings.slack_signing_secret or secrets.token_hex(16)
    settings = replace(settings, slack_signing_secret=secret)
    env = child_env(settings, dict(os.environ))
    from triagebot.db.engine import open_db
    open_db(settings.database_url)  # migrate once, before the children start
    exe = [sys.executable, "-m", "triagebot.cli"]
    procs = {name: subprocess.Popen(exe + argv, env=env) for name, argv in commands(settings).items()}
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        ok = _wait_port(settings.smtp_host, settings.smtp_port) and _wait_port(settings.web_host, settings.web_port)
        print(f"triagebot running: SMTP {settings.smtp_host}:{settings.smtp_port}, "
              f"web http://{settings.web_host}:{settings.web_port}, database {settings.database_url}", flush=True)
        if "imap" in procs:
            print(f"  IMAP poller: {settings.imap_host}:{settings.imap_port}, "
                  f"mailboxes {', '.join(settings.imap_mailboxes)}", flush=True)
        if "sender" in procs:
            print(f"  outgoing mail through {settings.relay_host}:{settings.relay_port}", flush=True)
        if not ok:
            print("a listener did not come up; see the messages above", file=sys.stderr)
            return 1
        seen: set[int] = set()
        if demo:
            print("demo: feeding the bundled samples", flush=True)
            feed_samples(settings, secret)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                show_progress(settings, seen)
                time.sleep(0.5)
                if len(seen) >= sum(1 for p in SAMPLES.iterdir() if p.suffix in (".eml", ".json")):
                    break
            show_progress(settings, seen)
            print("demo done; still running (Ctrl-C stops)", flush=True)
        while not stop["now"] and all(p.poll() is None for p in procs.values()):
            show_progress(settings, seen)
            time.sleep(1)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
