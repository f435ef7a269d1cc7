"""Settings from the environment and a TOML file: names, types, and which values are case-insensitive."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from triagebot.intake.smtp import IntakeController, IntakeHandler, LimitedSMTP
from triagebot.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_imap_mailbox_names_keep_their_case_from_the_environment_and_toml(tmp_path: Path) -> None:
    """IMAP mailbox names are case-sensitive (RFC 3501 §5.1; only INBOX is not): "Support/Inkorg" stays so."""
    env = {"TRIAGEBOT_IMAP_MAILBOXES": "INBOX, Support/Inkorg ,Kunder/Ärenden"}
    assert Settings.load(env=env).imap_mailboxes == ("INBOX", "Support/Inkorg", "Kunder/Ärenden")
    toml = tmp_path / "triagebot.toml"
    toml.write_text('[triagebot]\nimap_mailboxes = ["Support/Inkorg"]\nmail_domains = ["Support.Example.NET"]\n')
    loaded = Settings.load(env={}, toml_path=toml)
    assert loaded.imap_mailboxes == ("Support/Inkorg",)
    assert loaded.mail_domains == ("support.example.net",)


def test_mail_domains_are_lowercased() -> None:
    """Domain names are case-insensitive (RFC 5321 §2.4): compared lower-case everywhere."""
    env = {"TRIAGEBOT_MAIL_DOMAINS": "Support.Example.NET, LOCALHOST"}
    assert Settings.load(env=env).mail_domains == ("support.example.net", "localhost")


def test_the_smtp_rate_limit_and_the_imap_processed_folder_are_settings(tmp_path: Path) -> None:
    names = {f.name for f in fields(Settings)}
    assert {"smtp_max_messages_per_minute", "imap_processed_folder"} <= names
    default = Settings()
    assert default.smtp_max_messages_per_minute == 6000 and default.imap_processed_folder is None
    env = {"TRIAGEBOT_SMTP_MAX_MESSAGES_PER_MINUTE": "120", "TRIAGEBOT_IMAP_PROCESSED_FOLDER": "Support/Klart"}
    s = Settings.load(env=env)
    assert s.smtp_max_messages_per_minute == 120 and s.imap_processed_folder == "Support/Klart"
    toml = tmp_path / "triagebot.toml"
    toml.write_text('[triagebot]\nsmtp_max_messages_per_minute = 30\nimap_processed_folder = "Arkiv/Klart"\n')
    s = Settings.load(env={}, toml_path=toml)
    assert s.smtp_max_messages_per_minute == 30 and s.imap_processed_folder == "Arkiv/Klart"


def test_the_smtp_listener_applies_its_rate_limit_setting() -> None:
    settings = Settings(smtp_port=0, smtp_max_messages_per_minute=42)
    controller = IntakeController(IntakeHandler(None, settings.mail_domains), settings)  # type: ignore[arg-type]
    before = LimitedSMTP.max_per_minute
    try:
        controller.factory()
        assert LimitedSMTP.max_per_minute == 42
    finally:
        LimitedSMTP.max_per_minute = before


def test_the_rate_limit_and_processed_folder_are_in_the_readme() -> None:
    """The two new settings are documented in the README's settings table by their variable names."""
    readme = (ROOT / "README.md").read_text()
    for name in ("TRIAGEBOT_SMTP_MAX_MESSAGES_PER_MINUTE", "TRIAGEBOT_IMAP_PROCESSED_FOLDER"):
        assert name in readme, name
