"""Settings, loaded once from the environment (and an optional TOML file) into a frozen object."""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# a list setting whose values are compared case-insensitively (domain names, RFC 5321 §2.4) carries this in its
# field metadata and is lowercased on load; the others (IMAP mailbox names, RFC 3501 §5.1) keep their case
CASE_INSENSITIVE = {"case_insensitive": True}


def _split(v: str) -> tuple[str, ...]:
    """A comma-separated list, each item stripped, empty items dropped; the case is kept."""
    return tuple(x.strip() for x in v.split(",") if x.strip())


@dataclass(frozen=True)
class Settings:
    """Every deployment switch in one place; defaults are the embedded, local ones."""

    database_url: str = f"sqlite:///{ROOT / 'var' / 'triagebot.db'}"
    rules_dir: Path = ROOT / "rules"
    models_dir: Path = ROOT / "models"
    # mail intake
    mail_domains: tuple[str, ...] = field(default=("support.example.net", "localhost"), metadata=CASE_INSENSITIVE)
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 8025
    smtp_max_size: int = 25 * 1024 * 1024
    smtp_tls_cert: str | None = None
    smtp_tls_key: str | None = None
    smtp_auth_users: str | None = None
    smtp_max_connections_per_client: int = 20
    smtp_max_messages_per_minute: int = 6000           # per client address; over it MAIL gets 421
    imap_host: str | None = None
    imap_port: int = 993
    imap_ssl: bool = True
    imap_user: str | None = None
    imap_password: str | None = None
    imap_mailboxes: tuple[str, ...] = ("INBOX",)
    imap_poll_seconds: float = 30.0
    # stored mail is moved here (created if missing) instead of being marked read; `imap --move-to` overrides it
    imap_processed_folder: str | None = None
    # outgoing
    relay_host: str | None = None
    relay_port: int = 25
    support_address: str = "support@support.example.net"
    # web / slack
    web_host: str = "127.0.0.1"
    web_port: int = 8080
    slack_signing_secret: str | None = None
    slack_bot_token: str | None = None
    slack_app_token: str | None = None
    slack_api_url: str | None = None
    agent_channel: str | None = None
    # worker
    worker_batch: int = 10
    max_attempts: int = 5
    stale_claim_seconds: int = 300
    # severity / outage clustering
    outage_window_minutes: int = 60
    outage_critical_customers: int = 5
    review_confidence: float = 0.5
    # data protection: TRIAGEBOT_ENCRYPTION_KEY seals raw messages at rest (triagebot/crypto.py; "new,old" rotates);
    # `triagebot purge` without --older-than removes personal data older than retention_days
    encryption_key: str | None = field(default=None, repr=False)
    retention_days: int = 90

    @classmethod
    def load(cls, env: dict[str, str] | None = None, toml_path: str | Path | None = None) -> "Settings":
        """Defaults, then the TOML file (TRIAGEBOT_CONFIG or the argument), then TRIAGEBOT_* variables."""
        env = dict(os.environ if env is None else env)
        values: dict[str, object] = {}
        path = toml_path or env.get("TRIAGEBOT_CONFIG")
        if path:
            with open(path, "rb") as fh:
                values.update(tomllib.load(fh).get("triagebot", {}))
        for f in fields(cls):
            for key in (f"TRIAGEBOT_{f.name.upper()}", f.name.upper() if f.name.startswith("slack_") else None):
                if key and key in env:
                    values[f.name] = env[key]
        # the names the issue gives
        if "TRIAGEBOT_AGENT_CHANNEL" in env:
            values["agent_channel"] = env["TRIAGEBOT_AGENT_CHANNEL"]
        return cls(**{f.name: _coerce(f, values[f.name]) for f in fields(cls) if f.name in values})


def _coerce(f, v: object) -> object:
    default = f.default
    if isinstance(default, bool):
        return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(v)  # type: ignore[arg-type]
    if isinstance(default, float):
        return float(v)  # type: ignore[arg-type]
    if isinstance(default, tuple):
        items = tuple(str(x).strip() for x in v) if isinstance(v, (list, tuple)) else _split(str(v))
        return tuple(x.lower() for x in items) if f.metadata.get("case_insensitive") else items
    if isinstance(default, Path):
        return Path(str(v))
    return v
