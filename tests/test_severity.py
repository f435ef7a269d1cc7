"""The severity policy table and step: floors, ceilings, the customer-tier raise, repeated contacts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from triagebot.model import BlastRadius, Message, Triage
from triagebot.steps.blast_radius import BlastRadiusStep
from triagebot.steps.severity import SeverityPolicy, SeverityStep

LEVELS = ("low", "medium", "high", "critical")


@pytest.fixture(scope="module")
def step() -> SeverityStep:
    return SeverityStep()


def sev(step: SeverityStep, text: str, *, category: str | None = "incident", service: str | None = "data",
        tier: str = "single", classifier: str | None = None, customer_tier: str | None = None,
        lang: str = "en", subject: str | None = None) -> Triage:
    t = Triage(language=lang, category=category, service=service, severity=classifier,
               blast_radius=BlastRadius(None, tier), customer_tier=customer_tier)
    return step(Message(source="email", text=text, subject=subject), t)


@pytest.mark.parametrize("text,lang,tier,want", [
    ("our whole fleet is offline since 09:05", "en", "fleet", "critical"),
    ("tusentals mätare offline i natt", "sv", "mass", "critical"),
    ("about 40 of our water meters stopped reporting", "en", "many", "high"),
    ("3 gateways down, the production line cannot send data to the MES", "en", "few", "high"),
    ("fyra parkeringsautomater offline, vi tappar intäkter varje timme", "sv", "few", "high"),
    ("4 datáfonos sin conexión, no se puede cobrar con tarjeta", "es", "few", "high"),
    ("3 of our gateways are rejected with cause 27", "en", "few", "medium"),
    ("my tracker stopped working", "en", "single", "medium"),
    ("vi ser jättehög latens på alla våra enheter i stockholm", "sv", "fleet", "high"),
])
def test_outage_floors(step: SeverityStep, text: str, lang: str, tier: str, want: str) -> None:
    assert sev(step, text, tier=tier, lang=lang).severity == want


@pytest.mark.parametrize("text,lang", [
    ("our elevator alarm phone in Kista cannot make calls since yesterday", "en"),
    ("the emergency phones in 3 of the lifts cannot call the alarm centre", "en"),
    ("hisstelefonen i trapphus B kan inte ringa ut", "sv"),
    ("trygghetslarmen hos 12 brukare kan inte ringa larmcentralen", "sv"),
    ("los teléfonos de emergencia de los ascensores no llaman", "es"),
    ("los terminales de teleasistencia no consiguen establecer llamada", "es"),
    ("the personal alarms of our tenants do not connect", "en"),
])
def test_safety_equipment_failing_is_critical(step: SeverityStep, text: str, lang: str) -> None:
    t = sev(step, text, lang=lang, service="voice")
    assert t.severity == "critical"
    assert any("safety" in e.decision for e in t.trail)


@pytest.mark.parametrize("text,lang", [
    ("3 of our SIMs were replaced with new SIM cards last night. We have not ordered this.", "en"),
    ("someone logged into our portal from a Tor exit node and suspended 120 SIMs. it wasnt us", "en"),
    ("SIM-kortet har bytts ut. Vi har INTE beställt något byte. Vi misstänker bedrägeri.", "sv"),
    ("Nos llegó una confirmación de reposición de SIM y nosotros no la hemos solicitado.", "es"),
    ("nos han robado la SIM del cuadro y alguien la está usando", "es"),
])
def test_fraud_is_critical_in_any_category(step: SeverityStep, text: str, lang: str) -> None:
    for category in ("incident", "service_request"):
        assert sev(step, text, lang=lang, category=category, service="sim").severity == "critical"


def test_we_changed_nothing_is_not_fraud(step: SeverityStep) -> None:
    for text, lang in (("We have not changed anything on our side, the API key is the same.", "en"),
                       ("Vi har inte ändrat något hos oss.", "sv"),
                       ("La API key no la hemos cambiado y no hemos tocado nada.", "es")):
        assert sev(step, text, lang=lang, service="platform", tier="none").severity == "medium"


def test_deadlines_raise_service_requests_only(step: SeverityStep) -> None:
    text = "Please move the 200 SIMs to the EU roaming plan. This must be done before 15 December."
    assert sev(step, text, category="service_request", service="billing", tier="many").severity == "medium"
    assert sev(step, "Necesitamos roaming antes del viernes 28 para los 35 quioscos", lang="es",
               category="service_request", tier="many").severity == "medium"
    assert sev(step, "Röst måste vara aktiverat före driftstart den 20 januari.", lang="sv",
               category="service_request", service="voice", tier="many").severity == "medium"
    # an effective date is not a deadline; "no deadline" is not one either
    assert sev(step, "Please change the rate plan from December.", category="service_request",
               service="billing", tier="fleet").severity == "low"
    assert sev(step, "Please activate them. No deadline, whenever convenient before 1 May.",
               category="service_request", service="sim", tier="many").severity == "low"
    # a question with a date is still a question
    assert sev(step, "What will roaming cost before 15 December?", category="information_request",
               service="billing", tier="none").severity == "low"


def test_billing_dispute(step: SeverityStep) -> None:
    assert sev(step, "The roaming charge must be wrong. Please issue a credit note.", category="service_request",
               service="billing", tier="none").severity == "medium"
    assert sev(step, "What is the roaming charge on the invoice?", category="information_request",
               service="billing", tier="none").severity == "low"


def test_consumer_entertainment_is_low(step: SeverityStep) -> None:
    for text, lang in (("I can't watch Netflix at my summer house, it keeps buffering", "en"),
                       ("DET GÅR INTE ATT SE PÅ TV I STUGAN", "sv"),
                       ("en la casa del pueblo no puedo ver ni una serie", "es")):
        t = sev(step, text, lang=lang, classifier="medium")
        assert t.severity == "low"
        assert any(e.decision == "capped by consumer_entertainment" for e in t.trail)


def test_the_classifier_is_never_lowered_except_by_the_ceilings(step: SeverityStep) -> None:
    # a high from the classifier stands for a single-SIM incident (no rule says otherwise)
    assert sev(step, "the router is down", classifier="high").severity == "high"
    # critical needs a basis the taxonomy names (mass/fleet outage, safety, fraud)
    t = sev(step, "the router is down", classifier="critical")
    assert t.severity == "high"
    assert any(e.decision == "capped by critical_needs_basis" for e in t.trail)
    assert sev(step, "the lift emergency phone is down", classifier="critical").severity == "critical"
    # ... but the classifier alone cannot make an order or a question critical
    t = sev(step, "We want to buy 500 SIMs", category="order", service="sim", tier="none", classifier="critical")
    assert t.severity == "medium"
    assert any(e.decision == "capped by non_incident_ceiling" for e in t.trail)
    # unless there is a fraud or safety sign
    assert sev(step, "someone logged into our portal, it was not us. Please block the user.",
               category="service_request", service="platform", classifier="critical").severity == "critical"


def test_every_level_from_the_classifier_survives_when_rules_agree(step: SeverityStep) -> None:
    for lvl in LEVELS:
        t = sev(step, "all our devices are down", tier="fleet", classifier=lvl)
        assert t.severity == "critical"
        assert LEVELS.index(t.severity) >= LEVELS.index(lvl)


def test_no_classifier_value_derives_from_the_rules(step: SeverityStep) -> None:
    t = sev(step, "3 of the cow collars stopped sending", tier="few")
    assert t.severity == "medium"
    assert t.trail[0].decision == "start low" and "no classifier" in t.trail[0].detail
    # no category yet: "incident" comes from the words
    assert sev(step, "alla våra laddstolpar är offline", lang="sv", category=None, service=None,
               tier="fleet").severity == "critical"
    assert sev(step, "Hur ställer jag in APN?", lang="sv", category=None, service=None, tier="none").severity == "low"


def test_vip_is_one_level_up_with_its_own_trail_entry(step: SeverityStep) -> None:
    t = sev(step, "3 of our gateways are rejected", tier="few", customer_tier="vip")
    assert t.severity == "high"
    taxonomy = [e for e in t.trail if e.decision.startswith("taxonomy severity")]
    raise_ = [e for e in t.trail if e.decision.startswith("tier raise")]
    assert taxonomy[0].decision == "taxonomy severity medium"
    assert raise_[0].decision == "tier raise medium -> high" and "VIP" in raise_[0].detail
    assert sev(step, "a question about APN", category="information_request", tier="none",
               customer_tier="vip").severity == "medium"
    assert sev(step, "all our devices are down", tier="fleet", customer_tier="vip").severity == "critical"


def test_enterprise_raises_incidents_up_to_high(step: SeverityStep) -> None:
    assert sev(step, "the router is down", customer_tier="enterprise").severity == "high"
    assert sev(step, "about 40 meters are down", tier="many", customer_tier="enterprise").severity == "high"
    assert sev(step, "What is the APN?", category="information_request", tier="none",
               customer_tier="enterprise").severity == "low"
    t = sev(step, "the router is down", customer_tier="standard")
    assert t.severity == "medium" and not any(e.decision.startswith("tier raise") for e in t.trail)


def test_repeated_contacts() -> None:
    policy = SeverityPolicy.load()
    assert policy.raise_for_repeats("medium", 2) == ("medium", "")
    raised, why = policy.raise_for_repeats("medium", 3)
    assert raised == "high" and "3 contacts" in why
    assert policy.raise_for_repeats("high", 5)[0] == "high"          # up to high only


def test_other_dispositions_are_left_alone(step: SeverityStep) -> None:
    t = Triage(disposition="bounce")
    assert step(Message(source="email", text="all our devices are down"), t) is t


def test_shared_examples_end_to_end_without_a_classifier() -> None:
    path = Path(__file__).resolve().parents[2] / "shared" / "examples" / "examples.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared folder sits beside the project root)")
    br, sv = BlastRadiusStep(), SeverityStep()
    for line in path.read_text(encoding="utf-8").splitlines():
        ex = json.loads(line)
        exp = ex["expect"]
        if exp["disposition"] != "case":
            continue
        m = Message(source=ex["channel"], text=ex["body"], subject=ex["subject"])
        t = br(m, Triage(language=exp["language"], category=exp["category"], service=exp["service"]))
        assert sv(m, t).severity == exp["severity"], ex["body"]
