"""The customer registry: who a message is from, their tier, fleet size, countries and language.

Data in rules/customers.yaml (and free-mail domains in rules/freemail.txt); what agents change lives in the
database and is layered over the file with `CustomerRegistry.merged`. Unknown senders are a customer of their
own e-mail domain; senders from free-mail domains are individuals.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import yaml

from triagebot.model import Message
from triagebot.rules_loader import compose, RuleError, rules_path

CUSTOMERS_FILE = "customers.yaml"
FREEMAIL_FILE = "freemail.txt"
CUSTOMER_TIERS = ("standard", "enterprise", "vip")
LANGUAGES = ("en", "sv", "es")
# How a customer was found: in the registry, by the sender's own domain, a free-mail individual, or not at all.
MATCHES = ("registered", "domain", "individual", "unknown")
_FIELDS = {"name", "tier", "fleet_size", "countries", "language", "domains", "contacts", "slack_teams",
           "slack_channels"}
_DOMAIN = re.compile(r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{1,62}$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")


@dataclass(frozen=True)
class Customer:
    """One customer: an organisation from the registry, an unknown domain, or an individual."""

    name: str
    tier: str = "standard"
    fleet_size: int | None = None
    countries: tuple[str, ...] = ()
    language: str | None = None
    domains: tuple[str, ...] = ()
    contacts: tuple[str, ...] = ()
    slack_teams: tuple[str, ...] = ()
    slack_channels: tuple[str, ...] = ()
    match: str = "registered"      # one of MATCHES
    matched_by: str = ""           # what matched: "contact x@y", "domain y", "slack team T1", ...


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _scalar_list(path: Path, node: yaml.Node, what: str) -> list[tuple[int, str]]:
    if not isinstance(node, yaml.SequenceNode):
        raise RuleError(path, _line(node), f"{what} must be a list")
    out = []
    for child in node.value:
        if not isinstance(child, yaml.ScalarNode) or not str(child.value).strip():
            raise RuleError(path, _line(child), f"{what}: each entry must be a plain value")
        out.append((_line(child), str(child.value).strip()))
    return out


def _customer(path: Path, node: yaml.Node) -> tuple[Customer, dict[str, int]]:
    """One registry entry, checked field by field so an error names the field's line; and where each key is."""
    if not isinstance(node, yaml.MappingNode):
        raise RuleError(path, _line(node), "a customer must be a mapping of fields")
    fields: dict[str, yaml.Node] = {}
    for k, v in node.value:
        if k.value not in _FIELDS:
            raise RuleError(path, _line(k), f"unknown field {k.value!r} (known: {', '.join(sorted(_FIELDS))})")
        if k.value in fields:
            raise RuleError(path, _line(k), f"field {k.value!r} given twice")
        fields[k.value] = v
    if "name" not in fields:
        raise RuleError(path, _line(node), "a customer needs a 'name'")
    name = str(fields["name"].value).strip()
    if not isinstance(fields["name"], yaml.ScalarNode) or not name:
        raise RuleError(path, _line(fields["name"]), "'name' must be a non-empty text")
    tier = str(fields["tier"].value) if "tier" in fields else "standard"
    if tier not in CUSTOMER_TIERS:
        raise RuleError(path, _line(fields.get("tier", node)),
                        f"tier {tier!r} is not one of {', '.join(CUSTOMER_TIERS)}")
    fleet = None
    if "fleet_size" in fields:
        raw = fields["fleet_size"].value
        if not isinstance(raw, str) or not re.fullmatch(r"\d+", raw.replace("_", "")) or int(raw) < 1:
            raise RuleError(path, _line(fields["fleet_size"]),
                            f"fleet_size must be a positive whole number, got {raw!r}")
        fleet = int(raw.replace("_", ""))
    language = str(fields["language"].value) if "language" in fields else None
    if language is not None and language not in LANGUAGES:
        raise RuleError(path, _line(fields["language"]), f"language {language!r} is not one of {', '.join(LANGUAGES)}")
    where = {f"name {name.lower()}": _line(fields["name"])}
    countries = []
    for ln, c in _scalar_list(path, fields["countries"], "countries") if "countries" in fields else []:
        if not _COUNTRY.match(c):
            raise RuleError(path, ln, f"country {c!r} is not an ISO 3166 two-letter code")
        countries.append(c)
    domains = []
    for ln, d in _scalar_list(path, fields["domains"], "domains") if "domains" in fields else []:
        if not _DOMAIN.match(d.lower()):
            raise RuleError(path, ln, f"domain {d!r} is not a domain name")
        domains.append(d.lower())
        where[f"domain {d.lower()}"] = ln
    contacts = []
    for ln, c in _scalar_list(path, fields["contacts"], "contacts") if "contacts" in fields else []:
        if "@" in c and not _DOMAIN.match(c.rsplit("@", 1)[1].lower()):
            raise RuleError(path, ln, f"contact {c!r} is not an e-mail address or a Slack user id")
        contacts.append(c.lower() if "@" in c else c)
        where[f"contact {contacts[-1]}"] = ln
    teams = _scalar_list(path, fields["slack_teams"], "slack_teams") if "slack_teams" in fields else []
    chans = _scalar_list(path, fields["slack_channels"], "slack_channels") if "slack_channels" in fields else []
    where.update({f"slack team {t}": ln for ln, t in teams})
    where.update({f"slack channel {c}": ln for ln, c in chans})
    return Customer(name=name, tier=tier, fleet_size=fleet, countries=tuple(countries), language=language,
                    domains=tuple(domains), contacts=tuple(contacts), slack_teams=tuple(t for _, t in teams),
                    slack_channels=tuple(c for _, c in chans)), where


def load_customers(path: Path) -> tuple[Customer, ...]:
    """The customers of a registry file, validated; duplicates of names, domains or contacts are errors."""
    root = compose(path)
    if root is None:
        return ()
    if not isinstance(root, yaml.MappingNode):
        raise RuleError(path, 1, "expected a mapping with key 'customers'")
    seq = [v for k, v in root.value if k.value == "customers"]
    if not seq:
        raise RuleError(path, 1, "missing key 'customers'")
    if not isinstance(seq[0], yaml.SequenceNode):
        raise RuleError(path, _line(seq[0]), "'customers' must be a list")
    out: list[Customer] = []
    owners: dict[str, str] = {}
    for node in seq[0].value:
        c, where = _customer(path, node)
        for key, line in where.items():
            if key in owners:
                raise RuleError(path, line, f"{key} already belongs to {owners[key]!r}")
            owners[key] = c.name
        out.append(c)
    return tuple(out)


def load_freemail(path: Path) -> frozenset[str]:
    """The free-mail domains, one per line; a line that is not a domain is an error naming it."""
    if not path.exists():
        raise RuleError(path, None, "rule file is missing")
    out = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        s = line.strip().lower()
        if not s or s.startswith("#"):
            continue
        if not _DOMAIN.match(s):
            raise RuleError(path, n, f"{line.strip()!r} is not a domain name")
        out.add(s)
    return frozenset(out)


class CustomerRegistry:
    """Finds the customer of a message by contact, domain, Slack team or channel."""

    def __init__(self, customers: Iterable[Customer], freemail: Iterable[str] = ()) -> None:
        self.customers = tuple(customers)
        self.freemail = frozenset(d.lower() for d in freemail)
        self._by_name = {c.name.lower(): c for c in self.customers}
        self._by_contact = {x: c for c in self.customers for x in c.contacts}
        self._by_domain = {d: c for c in self.customers for d in c.domains}
        self._by_team = {t: c for c in self.customers for t in c.slack_teams}
        self._by_channel = {x: c for c in self.customers for x in c.slack_channels}

    @classmethod
    def load(cls, rules_dir: Path | None = None) -> "CustomerRegistry":
        """The registry of rules/customers.yaml and rules/freemail.txt, validated."""
        return _load(rules_path(CUSTOMERS_FILE, rules_dir), rules_path(FREEMAIL_FILE, rules_dir))

    def merged(self, changes: Iterable[Customer]) -> "CustomerRegistry":
        """A registry where the given customers (agents' changes from the database) replace those of the same name."""
        by_name = {c.name.lower(): c for c in self.customers}
        for c in changes:
            by_name[c.name.lower()] = c
        return CustomerRegistry(by_name.values(), self.freemail)

    def get(self, name: str | None) -> Customer | None:
        """A registered customer by name (case-insensitive)."""
        return self._by_name.get(name.lower()) if name else None

    def lookup(self, message: Message) -> Customer:
        """The customer a message is from; never None (unknown senders get a customer of their own)."""
        sender = (message.sender or "").strip()
        low = sender.lower()
        if low in self._by_contact:
            return replace(self._by_contact[low], match="registered", matched_by=f"contact {low}")
        if sender in self._by_contact:
            return replace(self._by_contact[sender], match="registered", matched_by=f"contact {sender}")
        domain = message.sender_domain
        if domain:
            parts = domain.split(".")
            for i in range(len(parts) - 1):
                d = ".".join(parts[i:])
                if d in self._by_domain:
                    return replace(self._by_domain[d], match="registered", matched_by=f"domain {d}")
        if message.team_id and message.team_id in self._by_team:
            return replace(self._by_team[message.team_id], match="registered",
                           matched_by=f"slack team {message.team_id}")
        if message.channel and message.channel in self._by_channel:
            return replace(self._by_channel[message.channel], match="registered",
                           matched_by=f"slack channel {message.channel}")
        if domain and domain in self.freemail:
            return Customer(name=low, match="individual", matched_by=f"free-mail domain {domain}",
                            contacts=(low,))
        if domain:
            return Customer(name=domain, match="domain", matched_by=f"unregistered domain {domain}",
                            domains=(domain,))
        if message.team_id:
            return Customer(name=f"slack:{message.team_id}", match="unknown",
                            matched_by=f"unregistered slack team {message.team_id}")
        return Customer(name="unknown", match="unknown", matched_by="no sender")


@lru_cache(maxsize=8)
def _load(customers: Path, freemail: Path) -> CustomerRegistry:
    return CustomerRegistry(load_customers(customers), load_freemail(freemail))
