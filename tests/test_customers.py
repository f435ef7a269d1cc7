"""The customer registry (rules/customers.yaml, rules/freemail.txt) and the customer step."""
from __future__ import annotations

from dataclasses import replace

import pytest

from triagebot.customers import Customer, CustomerRegistry
from triagebot.model import Message, Triage
from triagebot.steps.customer import CustomerStep


@pytest.fixture(scope="module")
def registry() -> CustomerRegistry:
    return CustomerRegistry.load()


def mail(sender: str | None, **kw) -> Message:
    return Message(source="email", text="hej", sender=sender, **kw)


def test_the_shipped_registry_has_the_example_customers(registry: CustomerRegistry) -> None:
    names = {c.name for c in registry.customers}
    assert {"Mälarkraft Elnät AB", "Aparcamientos Levante S.L.", "HissTeknik Stockholm AB",
            "Trygga Hem Omsorg AB", "NordTrans A/S", "Savanna Wildlife Park"} <= names
    utility = registry.get("mälarkraft elnät ab")
    assert utility is not None and utility.fleet_size == 40000 and utility.language == "sv"
    assert registry.get("Trygga Hem Omsorg AB").tier == "vip"


def test_lookup_by_known_contact(registry: CustomerRegistry) -> None:
    c = registry.lookup(mail("Mattias.Gron@malarkraft.example"))
    assert (c.name, c.match) == ("Mälarkraft Elnät AB", "registered")
    assert "contact" in c.matched_by


def test_lookup_by_domain_and_subdomain(registry: CustomerRegistry) -> None:
    assert registry.lookup(mail("someone.new@malarkraft.example")).name == "Mälarkraft Elnät AB"
    c = registry.lookup(mail("noc@drift.malarkraft.example"))
    assert c.name == "Mälarkraft Elnät AB" and c.matched_by == "domain malarkraft.example"
    assert registry.lookup(mail("x@larm.tryggahem.example")).tier == "vip"


def test_lookup_by_slack_team_and_channel(registry: CustomerRegistry) -> None:
    by_team = registry.lookup(Message(source="slack", text="down?", sender="U123", team_id="T0VOLTUP"))
    assert by_team.name == "VoltUp Charging Ltd"
    by_channel = registry.lookup(Message(source="slack", text="down?", sender="U9", channel="C0TRYGGALARM"))
    assert (by_channel.name, by_channel.tier) == ("Trygga Hem Omsorg AB", "vip")


def test_unknown_sender_is_a_customer_of_its_own_domain(registry: CustomerRegistry) -> None:
    c = registry.lookup(mail("ops@new-customer.example"))
    assert (c.name, c.tier, c.match, c.fleet_size) == ("new-customer.example", "standard", "domain", None)


def test_free_mail_senders_are_individuals(registry: CustomerRegistry) -> None:
    a = registry.lookup(mail("Lars.Svensson@gmail.com"))
    b = registry.lookup(mail("antonio@hotmail.es"))
    assert (a.name, a.match) == ("lars.svensson@gmail.com", "individual")
    assert b.name == "antonio@hotmail.es" and a.name != b.name


def test_no_sender_at_all(registry: CustomerRegistry) -> None:
    assert registry.lookup(mail(None)).match == "unknown"
    assert registry.lookup(Message(source="slack", text="x", team_id="T999")).name == "slack:T999"


def test_agents_changes_replace_the_file_entry(registry: CustomerRegistry) -> None:
    changed = replace(registry.get("NordTrans A/S"), tier="vip", fleet_size=1100)  # type: ignore[arg-type]
    newcomer = Customer(name="Kiosk AB", domains=("kiosk.example",), fleet_size=12)
    merged = registry.merged([changed, newcomer])
    assert merged.lookup(mail("henrik.madsen@nordtrans.example")).tier == "vip"
    assert merged.get("NordTrans A/S").fleet_size == 1100
    assert merged.lookup(mail("a@kiosk.example")).name == "Kiosk AB"
    assert registry.get("NordTrans A/S").tier == "standard"       # the original is unchanged


def test_customer_step_sets_customer_and_tier_with_a_trail(registry: CustomerRegistry) -> None:
    step = CustomerStep(registry=registry)
    t = step(mail("larmcentralen@tryggahem.example"), Triage(language="sv"))
    assert (t.customer, t.customer_tier) == ("Trygga Hem Omsorg AB", "vip")
    assert t.trail[-1].step == "customer" and "contact" in t.trail[-1].detail
    t = step(mail("someone@unknown.example"), Triage())
    assert (t.customer, t.customer_tier) == ("unknown.example", "standard")


def test_customer_step_loads_from_a_rules_dir(tmp_path) -> None:
    (tmp_path / "customers.yaml").write_text(
        "customers:\n  - name: Tiny AB\n    tier: vip\n    domains: [tiny.example]\n", encoding="utf-8")
    (tmp_path / "freemail.txt").write_text("gmail.com\n", encoding="utf-8")
    t = CustomerStep(rules_dir=tmp_path)(mail("a@tiny.example"), Triage())
    assert (t.customer, t.customer_tier) == ("Tiny AB", "vip")
