"""`triagebot run`: which of the Procfile's processes it starts, and with which settings.

The children are recorded instead of started (a stand-in for subprocess.Popen), so the test sees the command
lines and environments `run` would use; `./run.sh --demo` is the end-to-end check.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from triagebot import run as run_mod
from triagebot.settings import ROOT, Settings

PROCFILE = ROOT / "Procfile"


class Recorded:
    """A child process that was never started: it has already exited."""

    started: list["Recorded"] = []

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv, self.env = argv, env
        Recorded.started.append(self)

    def poll(self) -> int:
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        pass


@pytest.fixture
def started(monkeypatch, tmp_path: Path) -> list[Recorded]:
    Recorded.started = []
    monkeypatch.setattr(run_mod.subprocess, "Popen", Recorded)
    monkeypatch.setattr(run_mod, "_wait_port", lambda *a, **k: True)
    for name in ("TRIAGEBOT_CONFIG", "TRIAGEBOT_IMAP_HOST", "TRIAGEBOT_RELAY_HOST", "SLACK_SIGNING_SECRET"):
        monkeypatch.delenv(name, raising=False)
    return Recorded.started


def _commands(started: list[Recorded]) -> dict[str, list[str]]:
    return {p.argv[3]: p.argv[3:] for p in started}   # argv: python -m triagebot.cli <command> ...


def _procfile() -> dict[str, list[str]]:
    out = {}
    for line in PROCFILE.read_text().splitlines():
        name, _, command = line.partition(":")
        if command.strip():
            out[name.strip()] = command.split()[1:]     # without the leading "triagebot"
    return out


def test_without_imap_or_relay_it_starts_smtp_web_and_worker(started, tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert run_mod.run(settings) == 0
    assert set(_commands(started)) == {"smtp", "web", "worker"}


def test_with_imap_and_a_relay_it_also_starts_the_poller_and_the_sender(started, tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", imap_host="imap.example.net",
                        imap_user="support", imap_password="secret", imap_mailboxes=("INBOX", "Support/Inkorg"),
                        imap_processed_folder="Support/Klart", relay_host="relay.example.net", relay_port=2525)
    assert run_mod.run(settings) == 0
    commands = _commands(started)
    assert set(commands) == {"smtp", "web", "worker", "imap", "sender"}
    procfile = _procfile()
    for name in ("imap", "sender", "smtp", "web"):
        assert commands[name] == procfile[name], name   # the Procfile's own command lines
    # every child runs with the settings `run` was given, also those that came from a TOML file
    for p in started:
        child = Settings.load(env=p.env)
        assert child.imap_host == "imap.example.net" and child.imap_mailboxes == ("INBOX", "Support/Inkorg")
        assert child.imap_processed_folder == "Support/Klart" and child.imap_password == "secret"
        assert (child.relay_host, child.relay_port) == ("relay.example.net", 2525)
        assert child.database_url == settings.database_url


def test_only_an_imap_host_starts_the_poller(started, tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", imap_host="imap.example.net")
    assert run_mod.run(settings) == 0
    assert set(_commands(started)) == {"smtp", "web", "worker", "imap"}


def test_children_get_the_configured_signing_secret_not_a_random_one(started, tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", slack_signing_secret="from-toml")
    assert run_mod.run(settings) == 0
    assert all(Settings.load(env=p.env).slack_signing_secret == "from-toml" for p in started)
