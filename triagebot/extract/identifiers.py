"""SIM identifiers (ICCID, IMSI, MSISDN, IMEI) from a message's new text and its attached lists.

Follows TAXONOMY.md "identifiers": normal forms, Luhn checks, IMSI versus IMEI told apart by label, country
code and check digit, national numbers read with the message's language. The patterns are data in
rules/identifiers.jsonl. Plain compiled regexes, not spaCy: a blank spaCy tokenizer alone costs about 0.4 ms
per message, the whole budget of this area.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from triagebot.model import ID_KINDS, Identifiers
from triagebot.rules_loader import RuleError, load_jsonl, rules_path

RULES_FILE = "identifiers.jsonl"
LABELS = ("RUN", "MCC", "IMEI_TAC", "KIND_CUE", "CONTACT_CUE", "NOT_ID_CUE", "NATIONAL", "CALLING_CODE")
# An attached list is read as a table when one of these splits its lines into the same number of cells.
DELIMITERS = (";", "\t", "|", ",")
_MAX_GROUPS = 24          # a digit run longer than this is a log dump, not a list of identifiers
_SEPARATORS = re.compile(r"[^\d]+")
_ZERO_TRUNK = re.compile(r"\(0\)")
_LONG_DIGITS = re.compile(r"\d{6,}")
_SENTENCE_END = re.compile(r"[.!?;](?:\s|$)")


def luhn_ok(digits: str) -> bool:
    """True when the last digit is the Luhn check digit of the others (ISO/IEC 7812)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@dataclass(frozen=True)
class IdentifierRules:
    """The compiled content of rules/identifiers.jsonl."""

    run: re.Pattern[str]
    mccs: frozenset[str]
    imei_tacs: tuple[str, ...]
    kind_cues: tuple[tuple[str, re.Pattern[str]], ...]
    contact_cue: re.Pattern[str]
    not_id_cue: re.Pattern[str]
    national: dict[str, tuple[tuple[str, re.Pattern[str]], ...]]
    calling_codes: tuple[str, ...]

    @classmethod
    def load(cls, rules_dir: Path | None = None) -> "IdentifierRules":
        """Read and validate the rule file; a mistake raises RuleError naming file and line."""
        return _load_rules(rules_path(RULES_FILE, rules_dir))


def _compile(path: Path, line: int, pattern: object) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise RuleError(path, line, "field 'pattern' must be a non-empty string")
    try:
        return re.compile(pattern, re.IGNORECASE | re.MULTILINE)
    except re.error as e:
        raise RuleError(path, line, f"bad regex: {e}") from None


@lru_cache(maxsize=8)
def _load_rules(path: Path) -> IdentifierRules:
    if not path.exists():
        raise RuleError(path, None, "rule file is missing")
    run = None
    mccs: set[str] = set()
    tacs: list[str] = []
    kind_cues: list[tuple[str, re.Pattern[str]]] = []
    contact: list[str] = []
    not_id: list[str] = []
    national: dict[str, list[tuple[str, re.Pattern[str]]]] = {}
    codes: list[str] = []
    for item in load_jsonl(path):
        v = item.value
        if not isinstance(v, dict):
            raise RuleError(path, item.line, "expected a JSON object")
        label = v.get("label")
        if label not in LABELS:
            raise RuleError(path, item.line, f"label={label!r} is not one of {', '.join(LABELS)}")
        pattern = v.get("pattern")
        if label in ("MCC", "IMEI_TAC", "CALLING_CODE"):
            if not isinstance(pattern, str) or not pattern.isdigit():
                raise RuleError(path, item.line, f"{label} pattern must be digits, got {pattern!r}")
            if label == "MCC" and len(pattern) != 3:
                raise RuleError(path, item.line, f"an MCC has 3 digits, got {pattern!r}")
            (mccs.add(pattern) if label == "MCC" else tacs.append(pattern) if label == "IMEI_TAC"
             else codes.append(pattern))
            continue
        rx = _compile(path, item.line, pattern)
        if label == "RUN":
            if "body" not in rx.groupindex or "plus" not in rx.groupindex:
                raise RuleError(path, item.line, "the RUN pattern needs the groups 'plus' and 'body'")
            run = rx
        elif label == "KIND_CUE":
            kind = v.get("kind")
            if kind not in ID_KINDS:
                raise RuleError(path, item.line, f"kind={kind!r} is not one of {', '.join(ID_KINDS)}")
            kind_cues.append((kind, rx))
        elif label == "CONTACT_CUE":
            contact.append(f"(?:{pattern})")
        elif label == "NOT_ID_CUE":
            not_id.append(f"(?:{pattern})")
        elif label == "NATIONAL":
            lang, cc = v.get("language"), v.get("country_code")
            if not isinstance(lang, str) or not isinstance(cc, str) or not cc.isdigit():
                raise RuleError(path, item.line, "NATIONAL needs 'language' and a digit 'country_code'")
            if rx.groups != 1:
                raise RuleError(path, item.line, "a NATIONAL pattern captures the subscriber number in one group")
            national.setdefault(lang, []).append((cc, rx))
    if run is None:
        raise RuleError(path, None, "no RUN pattern")
    if not mccs:
        raise RuleError(path, None, "no MCC entries")
    return IdentifierRules(
        run=run, mccs=frozenset(mccs), imei_tacs=tuple(tacs), kind_cues=tuple(kind_cues),
        contact_cue=re.compile("|".join(contact) or r"(?!x)x", re.IGNORECASE),
        not_id_cue=re.compile("|".join(not_id) or r"(?!x)x", re.IGNORECASE),
        national={k: tuple(v) for k, v in national.items()}, calling_codes=tuple(codes))


class _Sink:
    """Identifiers in order of first appearance, de-duplicated per kind."""

    def __init__(self) -> None:
        self.found: dict[str, dict[str, None]] = {k: {} for k in ID_KINDS}

    def add(self, kind: str, value: str) -> None:
        self.found[kind].setdefault(value, None)

    def result(self) -> Identifiers:
        return Identifiers(**{k: tuple(v) for k, v in self.found.items()})


def _classify(digits: str, plus: bool, label: str | None, language: str, whole: bool,
              rules: IdentifierRules) -> tuple[str, str] | None:
    """(kind, normal form) for one candidate digit string, or None."""
    n = len(digits)
    if plus:
        # E.164: country code + subscriber number, at most 15 digits (ITU-T E.164 section 6)
        if 8 <= n <= 15 and digits[0] != "0" and whole:
            return "msisdn", "+" + digits
        return None
    if digits.startswith("89") and n in (19, 20):
        return "iccid", digits
    if n == 15:
        mcc_ok = digits[:3] in rules.mccs
        if label == "imei":
            return ("imei", digits) if luhn_ok(digits) else None
        if label == "imsi":
            return ("imsi", digits) if mcc_ok or digits[0] in "234567" else None
        if mcc_ok and not (luhn_ok(digits) and digits.startswith(rules.imei_tacs)):
            return "imsi", digits
        if luhn_ok(digits):
            return "imei", digits
        return None
    if not whole:
        return None
    for cc, rx in rules.national.get(language, ()):
        m = rx.match(digits)
        if m:
            return "msisdn", f"+{cc}{m.group(1)}"
    if label == "msisdn" and 10 <= n <= 15 and digits.startswith(rules.calling_codes):
        return "msisdn", "+" + digits
    return None


def _emit_run(groups: list[str], plus: bool, label: str | None, language: str, msisdn_ok: bool,
              rules: IdentifierRules, sink: _Sink) -> None:
    """Find the identifiers in one run of digit groups (a run may hold several, or one glued to a label)."""
    if len(groups) > _MAX_GROUPS:
        return
    whole = "".join(groups)
    hit = _classify(whole, plus, label, language, True, rules)
    if hit and (hit[0] != "msisdn" or msisdn_ok):
        sink.add(*hit)
        return
    if plus or len(groups) == 1:
        return
    # Not one identifier: look for the longest group sequences that are, preferring a Luhn-valid ICCID.
    i = 0
    while i < len(groups):
        best: tuple[int, tuple[str, str]] | None = None
        for j in range(len(groups), i, -1):
            digits = "".join(groups[i:j])
            if len(digits) > 20:
                continue
            hit = _classify(digits, False, label, language, j - i == 1, rules)
            if hit is None or (hit[0] == "msisdn" and not msisdn_ok):
                continue
            if best is not None and not (hit[0] == "iccid" and luhn_ok(digits)):
                continue            # after a check-digit-less ICCID only a Luhn-valid ICCID reading is better
            best = (j, hit)
            if hit[0] != "iccid" or luhn_ok(digits):
                break               # else keep looking for a Luhn-valid reading of the same groups
        if best:
            sink.add(*best[1])
            i = best[0]
        else:
            i += 1


def _label_before(prefix: str, rules: IdentifierRules) -> str | None:
    """The kind named by the last identifier label in the text before a number on its line."""
    best, pos = None, -1
    for kind, rx in rules.kind_cues:
        for m in rx.finditer(prefix):
            if m.start() > pos:
                best, pos = kind, m.start()
    return best


def _is_contact(prefix: str, prev_line: str, rules: IdentifierRules) -> bool:
    """The writer's own number: a contact label before it on its line, or alone under 'call me on:'."""
    last = None
    for last in rules.contact_cue.finditer(prefix):
        pass
    if last is not None:
        # "ring mig på 070-... . Kortet har nummer 070-...": a new sentence or an identifier label between
        # the contact phrase and the number means the number is about a SIM again
        between = prefix[last.end():]
        ends = list(_SENTENCE_END.finditer(between))
        if ends and between[ends[-1].end():].strip():
            return False               # words of a new sentence before the number
        return not _label_before(between, rules)
    return not prefix.strip() and prev_line.rstrip().endswith(":") and bool(rules.contact_cue.search(prev_line))


def _scan_lines(text: str, language: str, rules: IdentifierRules, sink: _Sink,
                column_label: str | None = None) -> None:
    """Identifiers in free text, line by line, with labels, contact and invoice guards."""
    sticky: str | None = column_label
    prev_line = ""
    for line in text.splitlines():
        if not line.strip():
            sticky, prev_line = column_label, ""
            continue
        matches = list(rules.run.finditer(line))
        if not matches:
            # a header line such as "IMSI:" or "Korten som sitter i nu:" labels the list under it
            label = _label_before(line, rules)
            if label and (line.rstrip().endswith(":") or len(line.split()) <= 3):
                sticky = label
            prev_line = line
            continue
        for m in matches:
            body = m.group("body")
            if sum(ch.isdigit() for ch in body) < 8:
                continue
            prefix = line[:m.start()]
            if rules.not_id_cue.search(prefix[-40:]):
                continue
            label = _label_before(prefix, rules) or sticky
            msisdn_ok = not _is_contact(prefix, prev_line, rules)
            groups = [g for g in _SEPARATORS.split(_ZERO_TRUNK.sub(" ", body)) if g]
            _emit_run(groups, bool(m.group("plus")), label, language, msisdn_ok, rules, sink)
        prev_line = line


def _split_row(line: str, delimiter: str) -> list[str]:
    return [c.strip().strip('"').strip("'").strip() for c in line.split(delimiter)]


def _delimiter(lines: list[str]) -> str | None:
    """The cell delimiter of a CSV-like list, or None when it reads as plain text."""
    sample = lines[:20]
    for d in DELIMITERS:
        counts = [ln.count(d) for ln in sample]
        if counts and min(counts) >= 1 and len(set(counts)) == 1:
            return d
        if d != "," and counts and sum(1 for c in counts if c >= 1) >= max(1, len(sample) * 3 // 4):
            return d
    return None


def _scan_table(text: str, language: str, rules: IdentifierRules, sink: _Sink) -> None:
    """Identifiers in an attached list: CSV with any delimiter, an XLSX sheet as text, or one per line."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return
    d = _delimiter(lines)
    if d is None:
        _scan_lines(text, language, rules, sink)
        return
    columns: dict[int, str | None] = {}
    skip: set[int] = set()
    for row in lines:
        cells = _split_row(row, d)
        if not columns and not skip and not any(_LONG_DIGITS.search(c) for c in cells):
            # the header row: which column holds which kind, which holds order or invoice numbers
            for i, c in enumerate(cells):
                columns[i] = _label_before(c, rules) if c else None
                if rules.not_id_cue.search(c + " "):
                    skip.add(i)
            continue
        for i, cell in enumerate(cells):
            if i in skip or not cell:
                continue
            label = columns.get(i)
            for m in rules.run.finditer(cell):
                body = m.group("body")
                if sum(ch.isdigit() for ch in body) < 8:
                    continue
                groups = [g for g in _SEPARATORS.split(_ZERO_TRUNK.sub(" ", body)) if g]
                _emit_run(groups, bool(m.group("plus")), label, language, True, rules, sink)


def extract_identifiers(text: str, language: str, attachments_text: str = "",
                        rules_dir: Path | None = None) -> Identifiers:
    """The ICCIDs, IMSIs, MSISDNs and IMEIs named in the new text and in attached lists, in normal form.

    Pass only the writer's new text (Message.text), never the quoted earlier mail or the signature.
    """
    rules = IdentifierRules.load(rules_dir)
    sink = _Sink()
    if text:
        _scan_lines(text, language, rules, sink)
    if attachments_text:
        _scan_table(attachments_text, language, rules, sink)
    return sink.result()
