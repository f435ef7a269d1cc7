"""Extraction from a message's new text: SIM identifiers and counts of affected SIMs."""
from triagebot.extract.counts import CountEvidence, estimate_count, tier_for_count
from triagebot.extract.identifiers import extract_identifiers, luhn_ok

__all__ = ["CountEvidence", "estimate_count", "extract_identifiers", "luhn_ok", "tier_for_count"]
