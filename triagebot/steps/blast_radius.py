"""The blast-radius step: how many of the customer's existing SIMs the message concerns (TAXONOMY.md)."""
from __future__ import annotations

from pathlib import Path

from triagebot.customers import CustomerRegistry
from triagebot.extract.counts import TIER_RANK, CountEvidence, estimate_count, tier_for_count
from triagebot.extract.identifiers import extract_identifiers
from triagebot.model import BlastRadius, Identifiers, Message, Triage

# Services whose incidents are about SIM traffic: an incident that names no count concerns one SIM.
SIM_TRAFFIC = ("data", "sms", "voice", "csd", "sim")
# Services where a message is rarely about SIM traffic: only explicit counts or identifiers say which SIMs.
COUNTLESS = ("platform", "billing", "other")
# Weak evidence: a bare noun ("the router", "the devices").
_WEAK = ("single", "plural", "none")


class BlastRadiusStep:
    """Sets triage.blast_radius: identifiers, the affected count, the customer's fleet size, and the tier."""

    name = "blast_radius"

    def __init__(self, rules_dir: Path | None = None, registry: CustomerRegistry | None = None) -> None:
        self.rules_dir = rules_dir
        self.registry = registry or CustomerRegistry.load(rules_dir)

    def __call__(self, message: Message, triage: Triage) -> Triage:
        if triage.disposition != "case":
            return triage
        ids = extract_identifiers(message.text, triage.language, message.attachment_text, rules_dir=self.rules_dir)
        count = estimate_count(message.text, triage.language, triage.category, rules_dir=self.rules_dir)
        if count.kind in _WEAK and message.subject:
            # "Bortfall efter OTA-uppdatering – ca 1 400 elmätare": the subject may carry the count the body lacks
            subj = estimate_count(message.subject, triage.language, triage.category, rules_dir=self.rules_dir)
            if subj.kind not in _WEAK:
                count = CountEvidence(subj.count, subj.kind, f"subject: {subj.words}", subj.negative, subj.ignored)
        customer = self.registry.get(triage.customer)
        fleet_size = customer.fleet_size if customer else None
        br = decide(ids, count, fleet_size, triage.category, triage.service,
                    bool(message.attachment_text and ids.distinct_sims()))
        detail = "; ".join(br.evidence)
        return triage.with_(blast_radius=br).note(
            self.name, f"{br.tier} (estimate {br.estimate})", detail)


def decide(ids: Identifiers, count: CountEvidence, fleet_size: int | None, category: str | None,
           service: str | None, from_attachment: bool = False) -> BlastRadius:
    """The estimate and tier from identifiers, the count evidence and the fleet size, with the evidence."""
    n_ids = ids.distinct_sims()
    evidence: list[str] = []
    if n_ids:
        kinds = ", ".join(f"{len(v)} {k}" for k, v in ids.as_dict().items() if v)
        evidence.append(f"identifiers: {kinds}" + (" (text and attached list)" if from_attachment else ""))
    if count.kind != "none":
        evidence.append(f"count: '{count.words}' ({count.kind}{'' if count.count is None else ' ' + str(count.count)})")
    if count.ignored:
        evidence.append("set aside: " + ", ".join(count.ignored))

    def result(estimate: int | None, tier: str, why: str) -> BlastRadius:
        return BlastRadius(estimate, tier, ids, tuple([why] + evidence))

    if category == "information_request":
        return result(None, "none", "a question: no SIM is affected")
    if category == "order":
        if n_ids:
            return result(n_ids, tier_for_count(n_ids), "an order that names existing SIMs")
        return result(None, "none", "an order: new SIMs do not count")
    kind = count.kind
    if service in COUNTLESS and kind in ("number", "single", "plural") and not (
            kind == "number" and count.basis == "affected" and (count.count or 0) >= 2):
        # a portal, billing or other message: only an explicit count of affected SIMs or identifiers count,
        # not "a search for an ICCID", not "we are 9,000 SIMs"
        if n_ids:
            return result(n_ids, tier_for_count(n_ids), "the identifiers listed")
        return result(None, "none", f"a {service} matter: no SIM named as affected")
    if kind == "fleet":
        if fleet_size:
            return result(fleet_size, tier_for_count(fleet_size),
                          f"the whole fleet: fleet size {fleet_size} from the registry")
        return result(None, "fleet", "the whole fleet, size unknown")
    if kind == "number" and count.count:
        est = max(count.count, n_ids)
        return result(est, tier_for_count(est), "the largest of the count and the identifiers")
    if kind in ("single", "plural") and n_ids:
        return result(n_ids, tier_for_count(n_ids), "the identifiers listed (the words name no number)")
    if kind in ("single", "plural") and service not in SIM_TRAFFIC and service is not None:
        # "the routers behind the tunnel": a bare noun in a tunnel or firewall message names no affected SIM
        return result(None, "none", f"a {service} matter: no SIM named as affected")
    if kind in ("mass_word", "many_word", "few_word", "single", "plural"):
        word_tier = count.tier
        if n_ids and TIER_RANK[tier_for_count(n_ids)] >= TIER_RANK[word_tier]:
            return result(n_ids, tier_for_count(n_ids), "the identifiers, at least as many as the words say")
        return result(count.count, word_tier, f"the words say {word_tier}")
    if n_ids:
        return result(n_ids, tier_for_count(n_ids), "the identifiers listed")
    if category == "incident" and service in SIM_TRAFFIC:
        return result(1, "single", "an incident that names no count: one SIM implied")
    return result(None, "none", "no SIM named")
