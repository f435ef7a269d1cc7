"""Suggested replies in the customer's language: an acknowledgement plus an answer from rules/replies.yaml."""
from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from triagebot.model import CATEGORIES, SERVICES
from triagebot.rules_loader import RuleError, load_yaml_items, rules_path

REPLY_LANGUAGES = ("en", "sv", "es")
FALLBACK_LANGUAGE = "en"
PLACEHOLDERS = {"reference"}
REPLIES_FILE = "replies.yaml"


@dataclass(frozen=True)
class Answer:
    """One knowledge-base answer and when it fits."""

    name: str
    texts: dict[str, str]
    services: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    line: int = 0


@dataclass(frozen=True)
class Replies:
    """The acknowledgements and answers of a rules folder."""

    acknowledgement: dict[str, str]
    answers: tuple[Answer, ...]


@dataclass(frozen=True)
class Suggestion:
    """A reply to suggest: its text, its language and which answer it used (None: acknowledgement only)."""

    text: str
    language: str
    answer: str | None


def fold(text: str) -> str:
    """Lower-case without accents, for keyword matching in en/sv/es alike."""
    return "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))


def _check_template(path: Path, line: int, where: str, text: object) -> str:
    if not isinstance(text, str) or not text.strip():
        raise RuleError(path, line, f"{where}: expected a non-empty text")
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise RuleError(path, line, f"{where}: bad placeholder: {e}") from None
    unknown = names - PLACEHOLDERS
    if unknown:
        raise RuleError(path, line, f"{where}: unknown placeholder(s) {', '.join(sorted(unknown))}; "
                                    f"allowed: {', '.join(sorted(PLACEHOLDERS))}")
    return text.strip()


def _key_line(path: Path, key: str) -> int:
    root = yaml.compose(path.read_text(encoding="utf-8"))
    if isinstance(root, yaml.MappingNode):
        for k, _v in root.value:
            if k.value == key:
                return k.start_mark.line + 1
    return 1


def load_replies(rules_dir: Path | None = None) -> Replies:
    """Load and validate rules/replies.yaml; RuleError names the file and line of a mistake."""
    path = rules_path(REPLIES_FILE, rules_dir)
    return _load(path, path.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _load(path: Path, _mtime: int) -> Replies:
    from triagebot.rules_loader import load_yaml
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise RuleError(path, 1, "expected a mapping with 'acknowledgement' and 'answers'")
    ack_line = _key_line(path, "acknowledgement")
    ack = data.get("acknowledgement")
    if not isinstance(ack, dict):
        raise RuleError(path, ack_line, "acknowledgement: expected a mapping of language to text")
    acknowledgement = {}
    for lang in REPLY_LANGUAGES:
        if lang not in ack:
            raise RuleError(path, ack_line, f"acknowledgement: missing language {lang!r}")
        acknowledgement[lang] = _check_template(path, ack_line, f"acknowledgement.{lang}", ack[lang])
    answers = []
    seen: set[str] = set()
    for item in load_yaml_items(path, "answers"):
        v = item.value
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            raise RuleError(path, item.line, "an answer needs a 'name'")
        name = v["name"]
        if name in seen:
            raise RuleError(path, item.line, f"answer {name!r} is defined twice")
        seen.add(name)
        unknown = set(v) - {"name", "services", "categories", "keywords", *REPLY_LANGUAGES}
        if unknown:
            raise RuleError(path, item.line, f"answer {name!r}: unknown key(s) {', '.join(sorted(unknown))}")
        texts = {}
        for lang in REPLY_LANGUAGES:
            if lang not in v:
                raise RuleError(path, item.line, f"answer {name!r}: missing language {lang!r}")
            texts[lang] = _check_template(path, item.line, f"answer {name!r}.{lang}", v[lang])
        lists = {}
        for key, allowed in (("services", SERVICES), ("categories", CATEGORIES), ("keywords", None)):
            values = v.get(key, [])
            if not isinstance(values, list) or not all(isinstance(x, str) and x.strip() for x in values):
                raise RuleError(path, item.line, f"answer {name!r}: {key} must be a list of words")
            if allowed is not None:
                bad = [x for x in values if x not in allowed]
                if bad:
                    raise RuleError(path, item.line, f"answer {name!r}: {key} {', '.join(bad)} not in TAXONOMY.md "
                                                     f"({', '.join(allowed)})")
            lists[key] = tuple(fold(x.strip()) if key == "keywords" else x for x in values)
        answers.append(Answer(name, texts, lists["services"], lists["categories"], lists["keywords"], item.line))
    return Replies(acknowledgement, tuple(answers))


def _hits(keywords: tuple[str, ...], folded: str) -> int:
    # a keyword matches at the start of a word: "activat" finds "activated", "apn" does not find "happen"
    return sum(1 for kw in keywords if re.search(r"(?<!\w)" + re.escape(kw), folded))


def choose_answer(replies: Replies, category: str | None, service: str | None, text: str) -> Answer | None:
    """The best-fitting answer for a case, or None when none fits."""
    folded = fold(text)
    best: tuple[int, Answer] | None = None
    for ans in replies.answers:
        if ans.categories and category not in ans.categories:
            continue
        if ans.services and service not in ans.services:
            continue
        hits = _hits(ans.keywords, folded)
        if ans.keywords and hits == 0:
            continue
        score = hits + (1 if ans.services else 0)
        if best is None or score > best[0]:
            best = (score, ans)
    return best[1] if best else None


def suggest_reply(language: str | None, category: str | None, service: str | None, subject: str | None,
                  text: str, reference: str, rules_dir: Path | None = None) -> Suggestion:
    """The reply to suggest for a case, in its language (English for 'other')."""
    replies = load_replies(rules_dir)
    lang = language if language in REPLY_LANGUAGES else FALLBACK_LANGUAGE
    answer = choose_answer(replies, category, service, f"{subject or ''}\n{text}")
    values = {"reference": reference}
    parts = [replies.acknowledgement[lang].format(**values)]
    if answer is not None:
        parts.append(answer.texts[lang].format(**values))
    return Suggestion("\n\n".join(parts), lang, answer.name if answer else None)
