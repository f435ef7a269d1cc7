"""How many SIMs a message says are affected: numbers, number words and quantity words in en, sv and es.

TAXONOMY.md "blast radius": a count counts only when it names affected SIMs ("about 150 vehicles", "60 of
our 400" is 60), never invoice figures, times, dates, amounts or the unaffected rest ("the other 9,000 are
fine"). Words and their roles are data in rules/counts.yaml; this module only reads them in order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import yaml

from triagebot.model import TIERS
from triagebot.rules_loader import Item, RuleError, rules_path

RULES_FILE = "counts.yaml"
KINDS = ("number", "fleet", "plural", "mass_word", "many_word", "few_word", "single", "none")
WORD_KINDS = ("few_word", "many_word", "mass_word")
_KIND_TIER = {"fleet": "fleet", "mass_word": "mass", "many_word": "many", "few_word": "few", "plural": "few",
              "single": "single", "none": "none"}
# Rank of word evidence when several are present: the widest wins.
_WORD_RANK = {"single": 1, "plural": 2, "few_word": 3, "many_word": 4, "mass_word": 5, "fleet": 6}
TIER_RANK = {t: i for i, t in enumerate(TIERS)}
_NOUN_WINDOW = 3          # modifiers allowed between a number and its noun: "3,200 electricity meters"

# Folding: lower case without accents, one character for one, so token offsets stay those of the text.
_FOLD = str.maketrans({**{c: "a" for c in "áàâäãåæ"}, **{c: "e" for c in "éèêë"}, **{c: "i" for c in "íìîï"},
                       **{c: "o" for c in "óòôöõø"}, **{c: "u" for c in "úùûü"}, "ñ": "n", "ç": "c", "’": "'"})


_CACHE_LIMIT = 50_000       # word caches are cleared when they grow past this, so memory stays bounded
_fold_cache: dict[str, str] = {}


def fold(s: str) -> str:
    """Lower case without accents ("Parquímetros" -> "parquimetros", "mätare" -> "matare")."""
    hit = _fold_cache.get(s)
    if hit is None:
        if len(_fold_cache) > _CACHE_LIMIT:
            _fold_cache.clear()
        hit = _fold_cache[s] = s.lower().translate(_FOLD)
    return hit


def tier_for_count(n: int | None) -> str:
    """The blast-radius tier of a count of SIMs."""
    if n is None or n <= 0:
        return "none"
    if n == 1:
        return "single"
    if n <= 10:
        return "few"
    if n <= 999:
        return "many"
    return "mass"


@dataclass(frozen=True)
class CountEvidence:
    """What the text says about how many SIMs are affected, and the words that said it."""

    count: int | None
    kind: str
    words: str = ""
    negative: bool = False          # "none of our devices": a failure statement, only meaningful for incidents
    ignored: tuple[str, ...] = ()   # numbers seen and set aside, with why ("'1 200' invoice")
    basis: str = ""                 # for numbers: "affected", or "possession"/"total" when only those were found

    @property
    def tier(self) -> str:
        """The tier this evidence implies on its own."""
        if self.count is not None and self.kind in ("number", "few_word"):
            return tier_for_count(self.count)
        return _KIND_TIER.get(self.kind, "none")


# --- the rules -------------------------------------------------------------------------------------------

class _Phrases:
    """Token sequences, found by first or by last token, longest first."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, ...], object] = {}
        self.by_first: dict[str, list[tuple[str, ...]]] = {}
        self.by_last: dict[str, list[tuple[str, ...]]] = {}

    def add(self, phrase: tuple[str, ...], value: object = True) -> None:
        if phrase in self.values:
            return
        self.values[phrase] = value
        for lst in (self.by_first.setdefault(phrase[0], []), self.by_last.setdefault(phrase[-1], [])):
            lst.append(phrase)
            lst.sort(key=len, reverse=True)     # longest first, so the longest phrase wins

    def at(self, texts: list[str], i: int) -> tuple[int, object] | None:
        """(end index, value) of the longest phrase starting at token i."""
        for ph in self.by_first.get(texts[i], ()):
            j = i + len(ph)
            if j <= len(texts) and tuple(texts[i:j]) == ph:
                return j, self.values[ph]
        return None

    def ending(self, texts: list[str], j: int) -> int:
        """Length of the longest phrase ending just before token j (0 when none)."""
        if j <= 0:
            return 0
        for ph in self.by_last.get(texts[j - 1], ()):
            i = j - len(ph)
            if i >= 0 and tuple(texts[i:j]) == ph:
                return len(ph)
        return 0

    def __contains__(self, word: str) -> bool:
        return (word,) in self.values


@dataclass
class LangRules:
    """The count words of one language, folded."""

    numbers: dict[str, int] = field(default_factory=dict)          # single-token number words
    number_phrases: _Phrases = field(default_factory=_Phrases)     # multi-token: "a couple of", "ett tjugotal"
    multipliers: dict[str, int] = field(default_factory=dict)
    joiners: set[str] = field(default_factory=set)
    phrases: _Phrases = field(default_factory=_Phrases)            # quantities, fleet, standalone phrases
    sg: set[str] = field(default_factory=set)
    pl: set[str] = field(default_factory=set)
    compound: bool = False
    not_nouns: set[str] = field(default_factory=set)
    not_noun_pairs: set[tuple[str, str]] = field(default_factory=set)
    counters: set[str] = field(default_factory=set)
    people: set[str] = field(default_factory=set)
    of: _Phrases = field(default_factory=_Phrases)
    determiners: set[str] = field(default_factory=set)
    possessives: set[str] = field(default_factory=set)
    pronouns: set[str] = field(default_factory=set)
    breakers: set[str] = field(default_factory=set)
    approximators: _Phrases = field(default_factory=_Phrases)
    units: _Phrases = field(default_factory=_Phrases)
    currency: set[str] = field(default_factory=set)
    other: _Phrases = field(default_factory=_Phrases)
    fine: _Phrases = field(default_factory=_Phrases)
    total: _Phrases = field(default_factory=_Phrases)
    invoice: set[str] = field(default_factory=set)
    possession: _Phrases = field(default_factory=_Phrases)
    count_cues: _Phrases = field(default_factory=_Phrases)
    affected: _Phrases = field(default_factory=_Phrases)
    loss: set[str] = field(default_factory=set)
    loss_phrases: _Phrases = field(default_factory=_Phrases)
    fleet_before_number: _Phrases = field(default_factory=_Phrases)
    name_words: set[str] = field(default_factory=set)
    address_words: set[str] = field(default_factory=set)
    time_words: _Phrases = field(default_factory=_Phrases)
    loose_approximators: _Phrases = field(default_factory=_Phrases)
    ratio_words: _Phrases = field(default_factory=_Phrases)
    _noun_cache: dict[str, str | None] = field(default_factory=dict)
    _numword_cache: dict[str, list[tuple[int, bool]] | None] = field(default_factory=dict)

    def noun_form(self, word: str) -> str | None:
        """'sg', 'pl' or 'both' when the word is a SIM-ish noun (Swedish compounds by their ending)."""
        hit = self._noun_cache.get(word, "?")
        if hit != "?":
            return hit  # type: ignore[return-value]
        if len(self._noun_cache) > _CACHE_LIMIT:
            self._noun_cache.clear()
        form = None
        if word not in self.not_nouns:
            form = _form(word in self.sg, word in self.pl)
            if form is None and "-" in word:
                return self.noun_form(word.rsplit("-", 1)[1])     # "test-sim", "SIM-korten"
            if form is None and self.compound:
                for k in range(1, len(word) - 3):
                    tail = word[k:]
                    if tail in self.not_nouns:
                        break
                    form = _form(tail in self.sg, tail in self.pl)
                    if form:
                        break
        self._noun_cache[word] = form
        return form

    def number_word(self, word: str) -> list[tuple[int, bool]] | None:
        """A number word as (value, is_multiplier) parts: "tjugofem" -> [(20, F), (5, F)]."""
        if word in self._numword_cache:
            return self._numword_cache[word]
        if len(self._numword_cache) > _CACHE_LIMIT:
            self._numword_cache.clear()
        parts: list[tuple[int, bool]] | None = None
        if word in self.numbers:
            parts = [(self.numbers[word], False)]
        elif word in self.multipliers:
            parts = [(self.multipliers[word], True)]
        elif "-" in word:
            sub = [self.number_word(p) for p in word.split("-")]
            parts = [x for s in sub for x in s] if all(sub) else None  # type: ignore[union-attr]
        elif self.compound and len(word) >= 5:
            parts = self._decompose(word)
        self._numword_cache[word] = parts
        return parts

    def _decompose(self, word: str) -> list[tuple[int, bool]] | None:
        if not word:
            return []
        for k in range(len(word), 1, -1):
            head = word[:k]
            if head in self.numbers or head in self.multipliers:
                rest = self._decompose(word[k:])
                if rest is not None:
                    first = (self.numbers[head], False) if head in self.numbers else (self.multipliers[head], True)
                    return [first] + rest
        return None


def _form(sg: bool, pl: bool) -> str | None:
    return "both" if sg and pl else "sg" if sg else "pl" if pl else None


def _phrase(s: str) -> tuple[str, ...]:
    # "approx." and "nos." are read as the word: the tokenizer keeps the dot apart
    return tuple(w.rstrip(".") or w for w in fold(s).split())


def _words(item: Item, path: Path, key: str = "words") -> list[str]:
    v = item.value.get(key)
    if not isinstance(v, list) or not all(isinstance(w, str) and w.strip() for w in v):
        raise RuleError(path, item.line, f"field {key!r} must be a list of words")
    return v


# libyaml when present: this file is read once per process, but the pure-Python parser takes ~0.2 s per pass
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _sections(path: Path) -> dict[str, list[Item]]:
    """Each top-level list of a YAML file as Items with their line numbers, parsed once."""
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader
    except yaml.MarkedYAMLError as e:
        raise RuleError(path, e.problem_mark.line + 1 if e.problem_mark else None, f"YAML error: {e.problem}") from None
    except ValueError as e:                       # e.g. an impossible date in a value
        raise RuleError(path, None, f"YAML error: {e}") from None
    if not isinstance(root, yaml.MappingNode) or not isinstance(data, dict):
        raise RuleError(path, 1, "expected a mapping of word lists")
    out: dict[str, list[Item]] = {}
    for k, v in root.value:
        if isinstance(v, yaml.SequenceNode):
            out[k.value] = [Item(child.start_mark.line + 1, value) for child, value in zip(v.value, data[k.value])]
    return out


def _items(sections: dict[str, list[Item]], path: Path, key: str, languages: tuple[str, ...]) -> list[Item]:
    items = sections.get(key)
    if items is None:
        raise RuleError(path, 1, f"missing key {key!r}")
    for it in items:
        if not isinstance(it.value, dict):
            raise RuleError(path, it.line, f"{key}: expected a mapping with 'lang'")
        if it.value.get("lang") not in languages:
            raise RuleError(path, it.line, f"{key}: lang={it.value.get('lang')!r} is not one of {', '.join(languages)}")
    return items


@lru_cache(maxsize=8)
def _load(path: Path) -> dict[str, LangRules]:
    if not path.exists():
        raise RuleError(path, None, "rule file is missing")
    sections = _sections(path)
    languages = tuple(it.value for it in sections.get("languages", []))
    if not languages or not all(isinstance(x, str) for x in languages):
        raise RuleError(path, 1, "missing key 'languages' (a list of language codes)")
    rules = {lang: LangRules(compound=(lang == "sv")) for lang in languages}

    def simple(key: str, apply: Callable[[LangRules, tuple[str, ...], Item], object]) -> None:
        for it in _items(sections, path, key, languages):
            for w in _words(it, path):
                apply(rules[it.value["lang"]], _phrase(w), it)

    for it in _items(sections, path, "number_words", languages):
        words = it.value.get("words")
        if not isinstance(words, dict) or not words:
            raise RuleError(path, it.line, "number_words: 'words' must map each word to its value")
        for w, v in words.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RuleError(path, it.line, f"number word {w!r} needs a whole number value, got {v!r}")
            ph = _phrase(str(w))
            r = rules[it.value["lang"]]
            if len(ph) == 1:
                r.numbers[ph[0]] = v
            else:
                r.number_phrases.add(ph, v)
    for it in _items(sections, path, "multipliers", languages):
        words = it.value.get("words")
        if not isinstance(words, dict) or not all(isinstance(v, int) and v in (100, 1000, 1000000)
                                                  for v in words.values()):
            raise RuleError(path, it.line, "multipliers: each word maps to 100, 1000 or 1000000")
        rules[it.value["lang"]].multipliers.update({fold(str(k)): v for k, v in words.items()})
    simple("number_joiners", lambda r, ph, it: r.joiners.add(ph[0]))
    for it in _items(sections, path, "quantities", languages):
        kind = it.value.get("kind")
        if kind not in WORD_KINDS:
            raise RuleError(path, it.line, f"quantities: kind={kind!r} is not one of {', '.join(WORD_KINDS)}")
        for w in _words(it, path):
            rules[it.value["lang"]].phrases.add(_phrase(w), ("quantity", kind, False))
    for it in _items(sections, path, "fleet", languages):
        form = it.value.get("form")
        if form not in ("possessive", "determiner"):
            raise RuleError(path, it.line, f"fleet: form={form!r} is not one of possessive, determiner")
        neg = it.value.get("negative", False)
        if not isinstance(neg, bool):
            raise RuleError(path, it.line, "fleet: 'negative' must be true or false")
        for w in _words(it, path):
            r = rules[it.value["lang"]]
            r.phrases.add(_phrase(w), ("fleet", form, neg))
            r.fleet_before_number.add(_phrase(w))
    simple("fleet_phrases", lambda r, ph, it: r.phrases.add(ph, ("standalone", "fleet", False)))
    simple("many_phrases", lambda r, ph, it: r.phrases.add(ph, ("standalone", "many_word", False)))
    simple("mass_phrases", lambda r, ph, it: r.phrases.add(ph, ("standalone", "mass_word", False)))
    simple("name_words", lambda r, ph, it: r.name_words.add(ph[0]))
    simple("address_words", lambda r, ph, it: r.address_words.add(ph[0]))
    simple("time_words", lambda r, ph, it: r.time_words.add(ph))
    simple("loose_approximators", lambda r, ph, it: r.loose_approximators.add(ph))
    simple("ratio_words", lambda r, ph, it: r.ratio_words.add(ph))
    for it in _items(sections, path, "nouns", languages):
        forms = it.value.get("forms")
        if not isinstance(forms, str) or forms.count("|") != 1:
            raise RuleError(path, it.line, "nouns: 'forms' must be \"singular forms | plural forms\"")
        sg, pl = forms.split("|")
        r = rules[it.value["lang"]]
        for part, target in ((sg, r.sg), (pl, r.pl)):
            for w in part.split(","):
                w = fold(w.strip())
                if not w:
                    raise RuleError(path, it.line, "nouns: an empty form between commas")
                target.add(w)
    for it in _items(sections, path, "not_nouns", languages):
        r = rules[it.value["lang"]]
        for w in _words(it, path):
            ph = _phrase(w)
            if len(ph) == 1:
                r.not_nouns.add(ph[0])
            elif len(ph) == 2:
                r.not_noun_pairs.add((ph[0], ph[1]))
            else:
                raise RuleError(path, it.line, f"not_nouns: {w!r} has more than two words")
    simple("counters", lambda r, ph, it: r.counters.add(ph[0]))
    simple("people_nouns", lambda r, ph, it: r.people.add(ph[0]))
    for it in _items(sections, path, "partitives", languages):
        r = rules[it.value["lang"]]
        for w in _words(it, path, "of"):
            r.of.add(_phrase(w))
        r.determiners.update(fold(w) for w in _words(it, path, "determiners"))
        r.possessives.update(fold(w) for w in _words(it, path, "possessives"))
        r.pronouns.update(fold(w) for w in _words(it, path, "pronouns"))
    simple("breakers", lambda r, ph, it: r.breakers.add(ph[0]))
    simple("approximators", lambda r, ph, it: r.approximators.add(ph))
    simple("units", lambda r, ph, it: r.units.add(ph))
    simple("currency_before", lambda r, ph, it: r.currency.add(ph[0]))
    simple("other_words", lambda r, ph, it: r.other.add(ph))
    simple("fine_words", lambda r, ph, it: r.fine.add(ph))
    simple("total_words", lambda r, ph, it: r.total.add(ph))
    simple("invoice_words", lambda r, ph, it: r.invoice.add(ph[0]))
    simple("possession", lambda r, ph, it: r.possession.add(ph))
    simple("count_cues", lambda r, ph, it: r.count_cues.add(ph))
    simple("affected_words", lambda r, ph, it: r.affected.add(ph))
    simple("loss_words", lambda r, ph, it: r.loss.add(ph[0]) if len(ph) == 1 else r.loss_phrases.add(ph))
    # units and currencies are international: "20 MB" and "300 EUR" read the same in every language
    all_units = [ph for r in rules.values() for ph in r.units.values]
    all_currency = set().union(*(r.currency for r in rules.values()))
    for r in rules.values():
        for ph in all_units:
            r.units.add(ph)
        r.currency |= all_currency
    for lang, r in rules.items():
        if not r.sg or not r.pl:
            raise RuleError(path, None, f"nouns: no singular or no plural nouns for {lang!r}")
        if not r.numbers:
            raise RuleError(path, None, f"number_words: none for {lang!r}")
    return rules


class CountRules:
    """The count words of every language, loaded once from rules/counts.yaml."""

    @staticmethod
    def load(rules_dir: Path | None = None) -> dict[str, LangRules]:
        """Read and validate the rule file; a mistake raises RuleError naming file and line."""
        return _load(rules_path(RULES_FILE, rules_dir))


# --- tokens ----------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
 (?P<id>\+?\d(?:[ \-\u00a0\u202f]?\d){7,})                    # identifiers, phone numbers, long dates
|(?P<date>\d{4}-\d{1,2}-\d{1,2}|\d{1,2}/\d{1,2}(?:/\d{2,4})?|\d{1,2}\.\d{1,2}\.\d{2,4}(?!\d))
|(?P<time>\d{1,2}:\d{2}(?::\d{2})?)
|(?P<ver>\d+(?:\.\d+){2,})                                     # versions: 4.2.1
|(?P<num>\d{1,3}(?:[ \u00a0\u202f]\d{3}(?!\d))+|\d{1,3}(?:[.,]\d{3}(?!\d))+|\d+)(?P<dec>[.,]\d+)?(?P<glue>[^\W\d_]+|%)?
|(?P<word>[^\W\d_]+(?:[-:'’][^\W\d_]+)*)
|(?P<brk>\n[ \t]*\n|[!?¡¿]+|\.(?=[ \t]*\n|\s*$|\s+[^\sa-zåäöáéíóúñü\d(])|\n(?=[ \t]*[^\sa-zåäöáéíóúñü]))
|(?P<nl>\n)
|(?P<punct>[^\s\w])
""", re.VERBOSE)

W, N, X, P, B = "w", "n", "x", "p", "b"     # word, whole number, other numeric, punctuation, sentence break
_CLAUSE_PUNCT = {",", ";", ":"}
_CLAUSE_WORDS = {"but", "men", "pero", "however", "although", "whereas", "mientras", "medan", "utom", "except"}
_SKIPPABLE = {"-", '"', "“", "”", "(", ")", "'", "/", "~"}


class _Text:
    """The tokens of one text: folded words, whole numbers, and sentence and clause numbers."""

    def __init__(self, text: str) -> None:
        self.raw = text
        kinds: list[str] = []
        texts: list[str] = []
        starts: list[int] = []
        ends: list[int] = []
        values: list[int | None] = []
        for m in _TOKEN.finditer(text):
            g = m.lastgroup
            if g == "nl":
                continue
            if g == "num":
                digits = re.sub(r"\D", "", m.group("num"))
                before = text[m.start() - 2:m.start()] if m.start() >= 2 else " " + text[:m.start()]
                # "v1", "GW-300", "CP-WF-01", "214-07": part of a name or code, not a number of things
                glued = (before[-1:].isalpha() or before[-1:] in ("_", "/")
                         or (before[-1:] == "-" and before[:1].isalnum()))
                if m.group("dec") or m.group("glue") or glued:
                    kinds.append(X)
                    values.append(None)
                else:
                    kinds.append(N)
                    values.append(int(digits))
                texts.append(m.group("num"))
            elif g == "word":
                kinds.append(W)
                texts.append(fold(m.group()))
                values.append(None)
            elif g == "brk":
                kinds.append(B)
                texts.append(".")
                values.append(None)
            elif g == "punct":
                kinds.append(P)
                texts.append(m.group().translate(_FOLD))
                values.append(None)
            else:
                kinds.append(X)
                texts.append(m.group())
                values.append(None)
            starts.append(m.start())
            ends.append(m.end())
        self.kinds, self.texts, self.starts, self.ends, self.values = kinds, texts, starts, ends, values
        self.n = len(kinds)
        sent, clause = [0] * self.n, [0] * self.n
        s = c = 0
        for i, k in enumerate(kinds):
            if k == B:
                s += 1
                c += 1
            elif (k == P and texts[i] in _CLAUSE_PUNCT) or (k == W and texts[i] in _CLAUSE_WORDS):
                c += 1
            sent[i], clause[i] = s, c
        self.sent, self.clause = sent, clause

    def span(self, i: int, j: int) -> str:
        """The original text of tokens i..j-1."""
        if i >= j:
            return ""
        return self.raw[self.starts[i]:self.ends[j - 1]]


@dataclass
class _Mention:
    start: int          # first token, approximators included
    num: int            # first token of the number itself
    end: int            # token after the number
    value: int
    stop: int = 0       # token after the noun or partitive that attaches it
    role: str = ""      # affected | possession | total | excluded | unattached
    why: str = ""
    head: bool = False  # the head of a partitive: "40 of them", "tre av våra"
    loss: bool = False  # its sentence says something is lost or failing


# --- reading the numbers ---------------------------------------------------------------------------------

class _Reader:
    """One pass over one text with one language's rules."""

    def __init__(self, t: _Text, r: LangRules, category: str | None) -> None:
        self.t, self.r, self.category = t, r, category
        self.used: set[int] = set()
        texts, kinds, n = t.texts, t.kinds, t.n
        # per-token facts, computed once: is it a SIM-ish noun, is it a loss word
        nouns: list[str | None] = [None] * n
        loss = [False] * n
        for i in range(n):
            if kinds[i] != W:
                continue
            w = texts[i]
            form = r.noun_form(w)
            if form and not ((i + 1 < n and (w, texts[i + 1]) in r.not_noun_pairs)
                             or (i > 0 and (texts[i - 1], w) in r.not_noun_pairs)):
                nouns[i] = form
            loss[i] = w in r.loss or w.endswith("n't") or (w in r.loss_phrases.by_first and
                                                           r.loss_phrases.at(texts, i) is not None)
        self.nouns, self.loss = nouns, loss
        self._numbers: dict[int, tuple[int, int] | None] = {}

    # helpers on tokens
    def word(self, i: int) -> str | None:
        return self.t.texts[i] if 0 <= i < self.t.n and self.t.kinds[i] == W else None

    def is_noun(self, i: int) -> str | None:
        return self.nouns[i] if 0 <= i < self.t.n else None

    def is_loss(self, i: int) -> bool:
        return self.loss[i] if 0 <= i < self.t.n else False

    def clause_has_loss(self, i: int) -> bool:
        c, t = self.t.clause[i], self.t
        j = i
        while j > 0 and t.clause[j - 1] == c:
            j -= 1
        while j < t.n and t.clause[j] == c:
            if self.is_loss(j):
                return True
            j += 1
        return False

    def find_noun(self, k: int, any_noun: bool = False) -> int | None:
        """The SIM-ish noun a number or quantifier at k-1 is attached to, within a few modifiers."""
        t, r = self.t, self.r
        last = None
        seen = 0
        j = k
        while j < t.n and seen <= _NOUN_WINDOW:
            if t.sent[j] != t.sent[k - 1 if k > 0 else 0]:
                break
            kind = t.kinds[j]
            if kind == P and t.texts[j] in _SKIPPABLE:
                j += 1
                continue
            if kind != W:
                break
            w = t.texts[j]
            if self.is_noun(j):
                return j
            if w in r.breakers or r.units.at(t.texts, j) or w in r.loss or w in r.people:
                if any_noun and w in r.people:
                    return None
                break
            last = j
            seen += 1
            j += 1
        if any_noun and last is not None and t.texts[last] not in r.people:
            return last
        return None

    def after_of(self, p: int) -> tuple[int, str, bool] | None:
        """After "of"/"av"/"de" at p: (next token, 'pronoun'|'det'|'bare', possessive)."""
        t, r = self.t, self.r
        hit = r.of.at(t.texts, p) if p < t.n else None
        if not hit:
            return None
        q = hit[0]
        w = self.word(q)
        if w in r.pronouns and not self.is_noun(q):
            return q + 1, "pronoun", False
        if w in r.determiners:
            return q + 1, "det", w in r.possessives
        return q, "bare", False

    # the numbers
    def mentions(self) -> list[_Mention]:
        t, r = self.t, self.r
        out: list[_Mention] = []
        i = 0
        while i < t.n:
            hit = self.number_at(i)
            if hit is not None and t.kinds[i] == W:
                ph = r.phrases.at(t.texts, i)
                if ph and ph[0] > hit[0]:
                    hit = None                          # "ett antal", "en del": a quantity word, not "one"
            if hit is None:
                i += 1
                continue
            end, value = hit
            k = i
            while True:
                back = r.approximators.ending(t.texts, k)
                if not back:
                    break
                k -= back
            out.append(_Mention(start=k, num=i, end=end, value=value))
            i = end
        return out

    def number_at(self, i: int) -> tuple[int, int] | None:
        """(end, value) of a number in digits or words starting at token i."""
        if i not in self._numbers:
            self._numbers[i] = self._number_at(i)
        return self._numbers[i]

    def _number_at(self, i: int) -> tuple[int, int] | None:
        t, r = self.t, self.r
        if t.kinds[i] == N:
            v, j = t.values[i] or 0, i + 1
            if j < t.n and t.texts[j] in r.multipliers and t.kinds[j] == W:
                v *= r.multipliers[t.texts[j]]
                j += 1
            return j, v
        if t.kinds[i] != W:
            return None
        ph = r.number_phrases.at(t.texts, i)
        if ph:
            return ph[0], int(ph[1])  # type: ignore[arg-type]
        parts = r.number_word(t.texts[i])
        if not parts:
            return None
        seq = list(parts)
        j = i + 1
        while j < t.n and t.kinds[j] == W:
            nxt = r.number_word(t.texts[j])
            if nxt:
                seq += nxt
                j += 1
            elif t.texts[j] in r.joiners and j + 1 < t.n and t.kinds[j + 1] == W and r.number_word(t.texts[j + 1]):
                j += 1
            else:
                break
        total = cur = 0
        for v, mult in seq:
            if mult and v == 100:
                cur = (cur or 1) * 100
            elif mult:
                total += (cur or 1) * v
                cur = 0
            else:
                cur += v
        return j, total + cur

    def classify(self, m: _Mention, by_end: dict[int, _Mention], earlier: list[_Mention]) -> None:
        """Give one number its role: affected, possession, total, excluded or unattached."""
        t, r = self.t, self.r
        k, j = m.start, m.end
        if m.value <= 0:
            m.role, m.why = "excluded", "zero"
            return
        if k > 0 and t.texts[k - 1] in r.currency:
            m.role, m.why = "excluded", "amount"
            return
        if j < t.n and (r.units.at(t.texts, j) or t.texts[j] in r.currency) and not self.is_noun(j):
            m.role, m.why = "excluded", "unit or amount"
            return
        if k == m.num and self.is_name(m.num):
            m.role, m.why = "excluded", "a name, not a count"
            return
        self.attach(m, k, j)
        if not m.stop:
            if any(e.role == "total" and t.sent[e.num] == t.sent[m.num] for e in earlier):
                m.stop, m.head = j, True                # "De nuestros 3.500 parquímetros, 60 no pueden ..."
            else:
                m.role = "unattached"
                return
        for x in range(m.num, m.stop):
            self.used.add(x)
        # why it might not be a count of affected SIMs
        if self.is_address(m):
            m.role, m.why = "excluded", "address"
            return
        lo = max(0, k - 8)
        hi = min(t.n, m.stop + 8)
        if any(t.sent[x] == t.sent[m.num] and t.texts[x] in r.invoice for x in range(lo, hi)):
            m.role, m.why = "excluded", "invoice"
            return
        if self.other_before(k) or self.fine_after(m):
            m.role, m.why = "excluded", "not affected"
            return
        if r.fleet_before_number.ending(t.texts, k):
            m.role, m.why = "affected", "all or none of them"
            return
        tail = self.tail_of(k, by_end)
        if tail:
            m.role, m.why = "total", tail
            return
        if not m.head and any(r.total.at(t.texts, x) for x in range(m.end, min(t.n, m.stop + 3))
                              if t.sent[x] == t.sent[m.num]):
            m.role, m.why = "total", "total or active"
            return
        if self.possessed(k) and not self.clause_has_loss(m.num):
            m.role, m.why = "possession", "what they have"
            return
        if r.ratio_words.ending(t.texts, k) and k - r.ratio_words.ending(t.texts, k) - 1 >= 0 and \
                (t.kinds[k - r.ratio_words.ending(t.texts, k) - 1] == N or
                 self.number_at(k - r.ratio_words.ending(t.texts, k) - 1)):
            m.role, m.why = "excluded", "a ratio"       # "one in eight units"
            return
        m.role = "affected"

    def possessed(self, k: int) -> bool:
        """"we have about 60 phones", "Scandinavian Rail har som ni vet drygt 40 000 SIM-kort"."""
        t, r = self.t, self.r
        for back in range(0, 4):
            x = k - back
            if x <= 0 or (back and t.kinds[x] != W) or t.clause[x - 1] != t.clause[k]:
                break
            if r.possession.ending(t.texts, x):
                return True
        return False

    def attach(self, m: _Mention, k: int, j: int) -> None:
        """Set m.stop past what the number is attached to: a noun, a partitive, a counter or an affected word."""
        t, r = self.t, self.r
        p = j
        if p < t.n and t.kinds[p] == P and t.texts[p] == "+":
            p += 1                                      # "1,000+ of our e-bikes"
        if p + 1 < t.n and t.texts[p] == "-" and t.texts[p + 1] in r.counters:
            p += 1                                      # "ett 30-tal"
        if p < t.n and t.texts[p] in r.counters:
            p += 1
            while p < t.n and t.kinds[p] == P and t.texts[p] == ".":
                p += 1
            m.stop = p
        of = self.after_of(p)
        if of is not None and of[1] != "bare":
            q, how, poss = of
            if how == "pronoun":
                m.head, m.stop = True, q
                return
            tail = self.number_at(q) if q < t.n else None
            if tail:
                q = tail[0]
            noun = self.find_noun(q, any_noun=poss)
            if noun is not None:
                m.head, m.stop = True, noun + 1
            elif tail:
                m.head, m.stop = True, q                # "23 de los 60 no levantan"
            elif self.people_after(p) is not None:
                m.head, m.stop = True, self.people_after(p) + 1   # "larmen hos 12 av våra brukare"
            return                                      # "one of our employees": not a SIM
        if of is not None and of[0] < t.n and self.is_noun(of[0]):
            m.head, m.stop = True, of[0] + 1            # "tre av korna"
            return
        if of is not None and of[0] < t.n and self.number_at(of[0]):
            m.head, m.stop = True, of[0]                # "3 of 40 meters": 40 is the total
            return
        if m.stop:
            return
        noun = self.find_noun(p)
        if noun is not None:
            m.stop = noun + 1
        elif p < t.n and r.affected.at(t.texts, p):
            m.stop = p + 1                              # "37 afectados"
        elif self.people_after(p) is not None:
            m.stop = self.people_after(p) + 1           # "trygghetslarmen hos 35 brukare"
        elif t.kinds[m.num] != N:
            return                                      # "un problema": number words need a noun
        elif self.count_cue_before(k) or (r.fleet_before_number.ending(t.texts, k) and
                                          self.word(j) not in r.people):
            m.stop = j                                  # "we count 74", "none of the 25 get a connection"
        elif self.is_time(k):
            return                                      # "desde las 8 sin ver un solo camión"
        elif self.loss_follows(p, k) or self.loose(m):
            m.stop = j                                  # "5 siguen sin conectar", "we think more than 200."

    def count_cue_before(self, k: int) -> bool:
        """"we count 74", "Totalt\n2 580" (a table cell under its heading)."""
        t, r = self.t, self.r
        if r.count_cues.ending(t.texts, k):
            return True
        return k > 0 and t.kinds[k - 1] in (B, P) and bool(r.count_cues.ending(t.texts, k - 1))

    def is_time(self, k: int) -> bool:
        return bool(self.r.time_words.ending(self.t.texts, k))

    def people_after(self, p: int) -> int | None:
        """A count of users whose devices fail: "trygghetslarmen hos 35 brukare", "terminales de 14 usuarios"."""
        t, r = self.t, self.r
        q = p
        of = self.after_of(p)
        if of is not None and of[1] == "det":
            q = of[0]
        for x in range(q, min(t.n, q + 3)):
            w = self.word(x)
            if w is None:
                return None
            if w in r.people:
                s = t.sent[p - 1]
                if any(self.is_noun(y) for y in range(max(0, p - 10), p - 1) if t.sent[y] == s):
                    return x
                return None
        return None

    def is_name(self, i: int) -> bool:
        """"bus 4417 tracker", "cow 214", "band 20": the number names one thing."""
        if i == 0:
            return False
        w = self.word(i - 1)
        if w is None:
            return self.t.texts[i - 1] in self.r.name_words
        return w in self.r.name_words or self.is_noun(i - 1) in ("sg", "both")

    def is_address(self, m: _Mention) -> bool:
        """"2 Station Road", "Storgatan 12", "Calle Mayor 12"."""
        t, r = self.t, self.r
        for x in range(m.end, min(t.n, m.stop + 1)):
            if t.kinds[x] == W and t.texts[x] in r.address_words and t.raw[t.starts[m.end]].isupper():
                return True
        for x in range(max(0, m.start - 2), m.start):
            w = self.word(x)
            if w and (w in r.address_words or (r.compound and w.endswith(("gatan", "vagen", "grand")))):
                return True
        return False

    def loss_follows(self, p: int, k: int | None = None) -> bool:
        """A loss word right after a number, and nothing before it that makes it a name: "5 siguen sin conectar"."""
        t, r = self.t, self.r
        if k is not None and k > 0 and t.kinds[k - 1] == W:
            w = t.texts[k - 1]
            if not (w in r.determiners or w in r.possessives or w in _CLAUSE_WORDS or w in r.joiners
                    or r.approximators.ending(t.texts, k)):
                return False                            # "Alcalá 214 no consigue", "Gran Vía 32 no conectan"
        for x in range(p, min(t.n, p + 2)):
            if t.kinds[x] != W:
                return False
            if self.is_loss(x) or r.affected.at(t.texts, x):
                return True
        return False

    def loose(self, m: _Mention) -> bool:
        """'a lot of SIMs, we think more than 200.': an approximate number closing a sentence about SIMs."""
        t = self.t
        if not self.r.loose_approximators.ending(t.texts, m.num) or (m.end < t.n and t.kinds[m.end] != B):
            return False
        return any(self.is_noun(x) for x in range(max(0, m.start - 15), m.start) if t.sent[x] == t.sent[m.num]
                   or t.sent[x] == t.sent[m.num] - 1)

    def other_before(self, k: int) -> bool:
        t, r = self.t, self.r
        for x in range(max(0, k - 3), k):
            if t.sent[x] == t.sent[k] and r.other.at(t.texts, x):
                return True
        return False

    def fine_after(self, m: _Mention) -> bool:
        """"the other 9,000 meters are fine": a fine word after it in its sentence and no loss word there."""
        return self.fine_from(m.num, m.num)

    def fine_from(self, start: int, anchor: int) -> bool:
        """A fine word from `start` to the end of its clause, and no loss word to the end of its sentence."""
        t, r = self.t, self.r
        s, c = t.sent[anchor], t.clause[anchor]
        fine = False
        x = start
        while x < t.n and t.sent[x] == s:
            hit = r.fine.at(t.texts, x)
            if hit:
                fine = fine or t.clause[x] == c          # "no impact" is fine, not a loss
                x = hit[0]
                continue
            if self.is_loss(x):
                return False
            x += 1
        return fine

    def tail_of(self, k: int, by_end: dict[int, _Mention]) -> str:
        """Why the number at k is the total a partitive draws from ("60 of our 400"), or ''."""
        t, r = self.t, self.r
        q = k
        if q > 0 and self.word(q - 1) in r.determiners:
            q -= 1
            det = True
        else:
            det = False
        n_of = r.of.ending(t.texts, q)
        if not n_of:
            return ""
        if t.texts[q - n_of:q] == ["out", "of"]:
            return "out of"
        before = q - n_of
        if before in by_end or r.phrases.ending(t.texts, before):
            return "partitive total"
        # "Av de 200 SIM-kort ...", "De nuestros 3.500 parquímetros, 60 ...": a partitive opening its clause;
        # elsewhere "de los 30 equipos" is only "of the 30 units"
        opens = before == 0 or t.clause[before - 1] != t.clause[before] or t.kinds[before - 1] in (B, P)
        return "partitive total" if det and opens else ""

    # the words
    def words(self) -> list[tuple[str, str, bool, int]]:
        """Quantity and fleet words and bare nouns: (kind, words, negative, token)."""
        t, r = self.t, self.r
        found: list[tuple[str, str, bool, int]] = []
        i = 0
        while i < t.n:
            if i in self.used or t.kinds[i] != W:
                i += 1
                continue
            hit = r.phrases.at(t.texts, i)
            if hit:
                end, (what, kind, neg) = hit  # type: ignore[misc]
                got = self.phrase_evidence(i, end, what, kind, neg)
                if got:
                    found.append(got)
                    i = max(end, got[3])
                    continue
            i += 1
        for i in range(t.n):
            if i in self.used:
                continue
            form = self.is_noun(i)
            if not form or self.other_before(i):
                continue
            if form == "both":
                if self.word(i - 1) not in r.possessives and self.word(i - 1) not in r.determiners:
                    continue
                form = "pl"
            found.append(("single" if form == "sg" else "plural", t.span(i, i + 1), False, i + 1))
        return found

    def phrase_evidence(self, i: int, end: int, what: str, kind: str,
                        neg: bool) -> tuple[str, str, bool, int] | None:
        """Evidence from a quantity or fleet phrase at i..end, when it is attached to SIMs (what: the phrase
        type, kind: its count kind, or for fleet phrases its form, possessive or determiner)."""
        t, r = self.t, self.r
        if what == "standalone":
            return kind, t.span(i, end), False, end
        if end < t.n and (t.kinds[end] == N or self.number_at(end)):
            return None                                        # "all 30 meters", "some 40 units": the number counts
        p = end
        poss = kind == "possessive"
        of = self.after_of(p)
        if of is not None:
            p, how, poss2 = of
            if how == "pronoun":
                if what == "fleet":
                    return None                                # "none of them": refers back, not the fleet
                return kind, t.span(i, p), False, p
            poss = poss or poss2
        elif self.word(p) in r.possessives:
            poss = True
            p += 1
        elif self.word(p) in r.determiners:
            p += 1
        noun = self.find_noun(p, any_noun=poss)
        if noun is None:
            # "unos cuantos sin datos", "hundreds affected"; a few-word needs the loss right after it
            if what == "quantity" and self.loss_follows(p) and (kind != "few_word" or p == end):
                return kind, t.span(i, p), False, p
            return None
        if what == "fleet" and p < t.n and r.other.at(t.texts, p):
            return None                                 # "all other buses fine"
        if what == "fleet" and not neg and self.category != "service_request" and not self.near_loss(i):
            return None                                 # "can you check the bearer on all SIMs?" says nothing failed
        if not neg and self.fine_from(noun + 1, noun):
            return None                                 # "all devices are reporting normally", "de flesta ... fungerar"
        for x in range(i, noun + 1):
            self.used.add(x)
        return ("fleet" if what == "fleet" else kind), t.span(i, noun + 1), neg and what == "fleet", noun + 1

    def near_loss(self, i: int) -> bool:
        """A loss word in the sentence of token i or the sentences next to it."""
        t = self.t
        s = t.sent[i]
        lo, hi = i, i
        while lo > 0 and t.sent[lo - 1] >= s - 1:
            lo -= 1
        while hi < t.n - 1 and t.sent[hi + 1] <= s + 1:
            hi += 1
        return any(self.is_loss(x) or self.r.affected.at(t.texts, x) for x in range(lo, hi + 1))

    def sentence_has_loss(self, i: int) -> bool:
        t = self.t
        s = t.sent[i]
        j = i
        while j > 0 and t.sent[j - 1] == s:
            j -= 1
        while j < t.n and t.sent[j] == s:
            if self.is_loss(j) or self.r.affected.at(t.texts, j):
                return True
            j += 1
        return False


def _choose(t: _Text, mentions: list[_Mention], words: list[tuple[str, str, bool, int]],
            category: str | None) -> CountEvidence:
    """The evidence that decides: the affected count, else the widest words, else a total."""
    if category is not None and category != "incident":
        words = [w for w in words if not w[2]]      # "none of our devices left Sweden" names no SIM to change
    best_word = max(words, key=lambda w: _WORD_RANK[w[0]], default=None)
    tails = {m.value for m in mentions if m.role == "total" and m.why == "partitive total"}
    for m in mentions:
        if m.role == "affected" and not m.head and m.value in tails and m.why != "all or none of them":
            m.role, m.why = "total", "the total of a partitive"   # "a pilot of 80 sensors ... 60 of the 80"
    affected = [m for m in mentions if m.role == "affected"]
    possession = [m for m in mentions if m.role == "possession"]
    ignored = tuple(f"'{t.span(m.start, max(m.stop, m.end))}' {m.why}" for m in mentions
                    if m.role in ("excluded", "total", "possession") and m.why)
    totals = [m for m in mentions if m.role == "total"]

    def number(m: _Mention) -> CountEvidence:
        return CountEvidence(m.value, "number", t.span(m.start, max(m.stop, m.end)), False, ignored, m.role)

    def word() -> CountEvidence:
        kind, text, neg, _ = best_word  # type: ignore[misc]
        count = 1 if kind == "single" else None
        return CountEvidence(count, kind, text, neg, ignored)

    if affected:
        m = max(affected, key=lambda x: x.value)
        if best_word:
            wkind = best_word[0]
            if wkind == "fleet" and m.value < 2:
                return word()
            if wkind in ("mass_word", "many_word") and \
                    TIER_RANK[_KIND_TIER[wkind]] > TIER_RANK[tier_for_count(m.value)]:
                return word()
        return number(m)
    if best_word and best_word[0] == "fleet" and possession:
        return number(max(possession, key=lambda x: x.value))   # "all our trucks in DE ... we have 120 there"
    if best_word and best_word[0] in ("fleet", "mass_word", "many_word", "few_word"):
        return word()
    if possession:
        return number(max(possession, key=lambda x: x.value))
    lossy_totals = [m for m in totals if m.loss]
    if lossy_totals:
        return number(max(lossy_totals, key=lambda x: x.value))  # "av de 200 SIM-kort ... går inget"
    if best_word:
        return word()
    return CountEvidence(None, "none", "", False, ignored)


def estimate_count(text: str, language: str, category: str | None = None,
                   rules_dir: Path | None = None) -> CountEvidence:
    """How many SIMs the text says are affected, of which kind, and the words that said it.

    `category`, when known, drops "none of our X" statements outside incidents.
    """
    rules = CountRules.load(rules_dir)
    r = rules.get(language) or rules.get("en")
    if r is None or not text:
        return CountEvidence(None, "none")
    t = _Text(text)
    reader = _Reader(t, r, category)
    mentions = reader.mentions()
    by_end = {m.end: m for m in mentions}
    for n, m in enumerate(mentions):
        reader.classify(m, by_end, mentions[:n])
        if m.role == "total":
            m.loss = reader.sentence_has_loss(m.num)
    words = reader.words()
    return _choose(t, mentions, words, category)
