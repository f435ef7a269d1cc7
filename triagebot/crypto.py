"""Encryption at rest of raw messages (the intake table's bytes, which hold the attachments too).

AES-256-GCM with a key from TRIAGEBOT_ENCRYPTION_KEY (URL-safe base64 of 32 bytes; `python -m triagebot.crypto`
prints a new one). A sealed blob is

    MAGIC (5 bytes) | key id (4 bytes) | nonce (12 bytes) | ciphertext + GCM tag

MAGIC starts with a NUL byte, which no stored mail (RFC 5322) or Slack event (JSON) starts with, so rows written
before encryption was switched on still read as plaintext. The key id names the key that sealed a blob, so a wrong
key is reported as such instead of as a corrupt row. Several keys may be given, comma-separated: the first seals,
all open (key rotation: put the new key first, keep the old one until every old row is purged).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"\x00TBE1"
KEY_ID_LEN = 4
NONCE_LEN = 12
KEY_LEN = 32
ENV_NAME = "TRIAGEBOT_ENCRYPTION_KEY"


class CryptoError(Exception):
    """A raw message cannot be sealed or opened: a missing, wrong or malformed key, or a damaged blob."""


def key_id(key: bytes) -> bytes:
    """A short, non-secret name of a key (a hash of it): which key sealed a blob."""
    return hashlib.sha256(b"triagebot key id\x00" + key).digest()[:KEY_ID_LEN]


def parse_key(text: str) -> bytes:
    """One key from its text form: URL-safe base64 (padding optional) or hex of exactly 32 bytes."""
    t = text.strip()
    raw: bytes | None = None
    if len(t) == 2 * KEY_LEN:
        try:
            raw = bytes.fromhex(t)
        except ValueError:
            raw = None
    if raw is None:
        try:
            raw = base64.urlsafe_b64decode(t + "=" * (-len(t) % 4))
        except (binascii.Error, ValueError):
            raw = b""
    if len(raw) != KEY_LEN:
        # never echo the value: it is (meant to be) a secret
        raise CryptoError(f"{ENV_NAME} must be {KEY_LEN} bytes as URL-safe base64 or hex "
                          f"(make one with `python -m triagebot.crypto`); got {len(t)} characters that are not")
    return raw


def generate_key() -> str:
    """A new random key in the form TRIAGEBOT_ENCRYPTION_KEY takes."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_LEN)).decode("ascii")


def is_sealed(blob: bytes) -> bool:
    """Whether stored bytes are a sealed blob (else they are plaintext from before encryption)."""
    return bytes(blob[:len(MAGIC)]) == MAGIC


@dataclass(frozen=True)
class Keyring:
    """The configured keys: the first seals, every one opens blobs it sealed."""

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys or any(len(k) != KEY_LEN for k in self.keys):
            raise CryptoError(f"a keyring needs one or more keys of {KEY_LEN} bytes")

    def __repr__(self) -> str:  # the keys are secrets: only their ids may show up in logs or tracebacks
        return f"Keyring(ids={[key_id(k).hex() for k in self.keys]})"

    @classmethod
    def from_setting(cls, value: str | None) -> "Keyring | None":
        """The keyring of a TRIAGEBOT_ENCRYPTION_KEY value ("new" or "new,old,..."); None when unset or blank."""
        if value is None or not value.strip():
            return None
        return cls(tuple(parse_key(part) for part in value.split(",") if part.strip()))

    def seal(self, plain: bytes) -> bytes:
        """Encrypt with the first key; the header is authenticated too (GCM associated data)."""
        key = self.keys[0]
        header = MAGIC + key_id(key)
        nonce = os.urandom(NONCE_LEN)  # random 96-bit nonces: fine far beyond any desk's message count
        return header + nonce + AESGCM(key).encrypt(nonce, bytes(plain), header)

    def open(self, blob: bytes) -> bytes:
        """Decrypt a sealed blob; plaintext (unsealed) bytes are returned as they are."""
        blob = bytes(blob)
        if not is_sealed(blob):
            return blob
        header_len = len(MAGIC) + KEY_ID_LEN
        if len(blob) < header_len + NONCE_LEN + 16:
            raise CryptoError("sealed blob is truncated")
        header, kid = blob[:header_len], blob[len(MAGIC):header_len]
        nonce, body = blob[header_len:header_len + NONCE_LEN], blob[header_len + NONCE_LEN:]
        for key in self.keys:
            if key_id(key) == kid:
                try:
                    return AESGCM(key).decrypt(nonce, body, header)
                except InvalidTag:
                    raise CryptoError(f"sealed blob (key id {kid.hex()}) fails authentication: "
                                      "damaged or altered") from None
        raise CryptoError(f"sealed with key id {kid.hex()}, which is not among the configured keys "
                          f"{[key_id(k).hex() for k in self.keys]}: wrong {ENV_NAME}?")


def open_blob(blob: bytes, keyring: Keyring | None) -> bytes:
    """Plaintext of stored bytes under a keyring that may be absent; CryptoError names what is missing."""
    if not is_sealed(blob):
        return bytes(blob)
    if keyring is None:
        kid = bytes(blob[len(MAGIC):len(MAGIC) + KEY_ID_LEN]).hex()
        raise CryptoError(f"stored encrypted (key id {kid}) but {ENV_NAME} is not set")
    return keyring.open(blob)


# -- the process's keyring ---------------------------------------------------------------------------------
# The intake functions have no settings parameter (listeners call them with a session factory only), so the
# keyring is per process: the CLI configures it from its Settings; otherwise it comes from Settings.load()
# (the environment and TRIAGEBOT_CONFIG) the first time it is needed.

_UNSET = object()
_active: "Keyring | None | object" = _UNSET


def configure(value: "str | Keyring | None") -> Keyring | None:
    """Set the process's keyring from a setting value (or a Keyring, or None for none); returns it."""
    global _active
    ring = value if isinstance(value, Keyring) or value is None else Keyring.from_setting(value)
    _active = ring
    return ring


def reset() -> None:
    """Forget the configured keyring; the next use loads it from the settings again."""
    global _active
    _active = _UNSET


def active() -> Keyring | None:
    """The process's keyring (None: encryption off)."""
    if _active is _UNSET:
        from triagebot.settings import Settings
        return configure(Settings.load().encryption_key)
    return _active  # type: ignore[return-value]


@contextmanager
def using(value: "str | Keyring | None") -> Iterator[Keyring | None]:
    """Use a keyring for the duration of a block (tests, one-off tools), then restore the previous one."""
    global _active
    before = _active
    try:
        yield configure(value)
    finally:
        _active = before


def seal(plain: bytes) -> bytes:
    """Seal with the process's keyring, or return the bytes unchanged when encryption is off."""
    ring = active()
    return ring.seal(plain) if ring is not None else bytes(plain)


def unseal(blob: bytes) -> bytes:
    """Open stored bytes with the process's keyring (plaintext passes through); CryptoError when it cannot."""
    return open_blob(blob, active())


if __name__ == "__main__":
    print(generate_key())
