"""Text features for the classifiers: spaCy tokens and lookup lemmas per language, identifiers and numbers
folded into shape tokens, then word and character n-gram TF-IDF.

The model input is the pair (language, text) where text is `model_text(subject, message.text)`: the same
function builds it at training time and in the classify step, so the model never sees text shaped differently
from what it meets at run time.
"""
from __future__ import annotations

import re
import threading
import unicodedata
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import spacy
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import NotFittedError
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import FeatureUnion, Pipeline
from spacy.language import Language
from spacy.tokenizer import Tokenizer

# spaCy blank pipelines with a lookup lemmatizer (spacy-lookups-data); "other" gets the multi-language tokenizer.
LEMMA_LANGUAGES = ("en", "sv", "es")
LANGUAGE_TOKEN = "zzlang{}"

# Long pastes (modem logs, CSV lists) add little beyond their start and would make one message cost many
# times the typical one; the cut keeps classification time bounded.
MAX_CHARS = 4000
MAX_VOCAB = 200_000

# Placeholders are plain lower-case words so the spaCy tokenizer keeps them whole.
_PREPASS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(?:https?://|www\.)\S+"), " zzurl "),
    (re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), " zzemail "),
    # ICCID: 19-20 digits starting 89, written with spaces or dashes, maybe a trailing F (TAXONOMY.md)
    (re.compile(r"(?<![\d+])89(?:[ \-]?\d){17,18}[fF]?(?!\d)"), " zziccid "),
    # 15 digits in one piece: IMSI or IMEI; which one does not matter to the category
    (re.compile(r"(?<![\d+])\d{15}(?!\d)"), " zzid15 "),
    # IPv4 addresses and subnets: static IPs and tunnels point at network_access
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?:/\d{1,2})?\b"), " zzip "),
    # ISO dates and dotted/slashed dates before the phone rule eats them
    (re.compile(r"\b\d{4}-\d{1,2}-\d{1,2}\b|\b\d{1,2}[./]\d{1,2}[./]\d{2,4}\b"), " zzdate "),
    # clock times and time ranges ("22:00-02:00")
    (re.compile(r"\b\d{1,2}[:.]\d{2}(?::\d{2})?\b"), " zztime "),
    # phone numbers and other long digit runs with separators (8+ digits): "+46 8 555 012 34", "073-551 20 09"
    (re.compile(r"(?<![\w+])\+?\(?\d(?:[ \-()]{0,2}\d){7,}"), " zzphone "),
    # versions: "4.2.1", "v2.3"
    (re.compile(r"\bv?\d+(?:\.\d+){2,}\b|\bv\d+(?:\.\d+)+\b", re.IGNORECASE), " zzver "),
)
# a count written with thousands separators: "3,200", "1 400" (sv), "3.200" (es) -> plain digits
_THOUSANDS = re.compile(r"(?<![\d.,])(\d{1,3})((?:[ \u00a0\u202f.,]\d{3})+)(?![\d]|[.,]\d)")
_HAS_DIGIT = re.compile(r"\d")
_SEPARATORS = re.compile(r"[ \u00a0\u202f.,]")
_DECIMAL = re.compile(r"(?<![\d.,])\d+[.,]\d+(?![\d.,]*\d)")
# letters and digits mixed ("k8s", "fw42b", "ab12cd"): keep the shape, not the value, when long
_MIXED = re.compile(r"^(?=.*\d)(?=.*[a-z])[a-z0-9\-_/]{6,}$")
_KEEP_PUNCT = {"?": "zzq", "!": "zzexcl", "¿": "zzq", "¡": "zzexcl"}

_nlp_cache: dict[str, Language] = {}
_nlp_lock = threading.Lock()
_full_tables: dict[str, dict[str, str]] = {}


def model_text(subject: str | None, text: str) -> str:
    """The text a classifier sees: subject, a newline, and the new text of the message."""
    return f"{subject or ''}\n{text or ''}"


def _tokenizer_rules() -> dict[str, Callable]:
    """Prefix/suffix/infix rules of our spaCy tokenizer: punctuation only.

    spaCy's default rules (URL matching, thousands of exceptions) cost ~200 µs for a typical message, most
    of the classification budget; identifiers, numbers, URLs and e-mail addresses are already folded into
    single tokens by `prepass`, so punctuation splitting is all that is left to do (~12 µs).
    """
    return {
        "prefix_search": re.compile(r"""^[\[\({"'«‹“‘„¿¡*<>=:;,.!?/\\#%&+~|…-]""").search,
        "suffix_search": re.compile(r"""[\])}"'»›”’*<>=:;,.!?/\\#%&+~|…-]$""").search,
        "infix_finditer": re.compile(
            r"""[/\\()\[\]{}=:;,!?¿¡"“”«»|+*<>…]|(?<=[^\W\d_])[.'’](?=[^\W\d_])|(?<=[^\W\d_])-(?=[^\W\d_])|--+"""
        ).finditer,
    }


def get_nlp(language: str) -> Language:
    """The cached spaCy blank pipeline for a language ("xx" for other languages) with our tokenizer rules."""
    lang = language if language in LEMMA_LANGUAGES else "xx"
    nlp = _nlp_cache.get(lang)
    # a spaCy vocab keeps every string it has seen: in a worker running for months that grows without
    # bound, so a pipeline is replaced by a fresh one once it holds MAX_VOCAB entries
    if nlp is not None and len(nlp.vocab) < MAX_VOCAB:
        return nlp
    with _nlp_lock:
        nlp = _nlp_cache.get(lang)
        if nlp is None or len(nlp.vocab) >= MAX_VOCAB:
            nlp = spacy.blank(lang)
            nlp.tokenizer = Tokenizer(nlp.vocab, **_tokenizer_rules())
            _nlp_cache[lang] = nlp
    return nlp


def full_lemma_table(language: str) -> dict[str, str]:
    """spacy-lookups-data's lemma_lookup table for en/sv/es, lower-case entries only (the tokens are lower-case).

    This is the table spaCy's lemmatizer uses in "lookup" mode (lemma = table.get(text, text)). It is large
    (sv 660k entries, es 490k: ~340 MB and 4 s to load all three), so it is only read while training;
    the model keeps the entries that map onto a lemma seen in the training data (SpacyAnalyzer.lemmas_).
    """
    if language not in LEMMA_LANGUAGES:
        return {}
    table = _full_tables.get(language)
    if table is None:
        import spacy_lookups_data
        from spacy.util import load_language_data

        raw = load_language_data(spacy_lookups_data.get_file(f"{language}_lemma_lookup.json"))
        table = _full_tables[language] = {k: v for k, v in raw.items() if k == k.lower() and k != v}
    return table


def strip_accents(s: str) -> str:
    """The string without combining accents ("módem" -> "modem"), since writers often leave them out."""
    if s.isascii():
        return s
    decomposed = unicodedata.normalize("NFD", s)
    # keep å/ä/ö distinct from a/o: in Swedish they are different letters, not accented ones
    out = []
    for ch in decomposed:
        if unicodedata.combining(ch) and out and out[-1] in "aoAO" and ch in "\u030a\u0308":
            out[-1] = unicodedata.normalize("NFC", out[-1] + ch)
        elif not unicodedata.combining(ch):
            out.append(ch)
    return "".join(out)


def _count_token(value: int) -> str:
    # buckets follow the blast-radius tiers of TAXONOMY.md: 1, 2-10, 11-999, 1000+
    if value <= 1:
        return "zznum1"
    if value <= 10:
        return "zznumfew"
    if value <= 999:
        return "zznummany"
    return "zznummass"


def prepass(text: str) -> str:
    """Lower-case text with identifiers, dates, IPs, phone numbers and grouped counts folded to tokens."""
    s = text[:MAX_CHARS].lower()
    if not _HAS_DIGIT.search(s):
        # most chat lines and many mails have no digits: only the URL/e-mail rules can apply (saves ~60 µs)
        if "@" in s or "http" in s or "www." in s:
            for pattern, repl in _PREPASS[:2]:
                s = pattern.sub(repl, s)
        return s
    for pattern, repl in _PREPASS:
        s = pattern.sub(repl, s)
    s = _THOUSANDS.sub(lambda m: m.group(1) + _SEPARATORS.sub("", m.group(2)), s)
    # what is left with a decimal point or comma is a measurement ("1,5 GB"), not a count
    return _DECIMAL.sub(" zzdecimal ", s)


def analyse(language: str, text: str, lemmas: Mapping[str, str] | None = None) -> list[str]:
    """The tokens the vectorizers see for one message: lemmas, shape tokens and the language token.

    `lemmas` maps a lower-case word to its lemma (a lemma_lookup table); words it lacks stay as they are.
    """
    lemmas = lemmas or {}
    doc = get_nlp(language).tokenizer(prepass(text))
    out = [LANGUAGE_TOKEN.format(language if language in LEMMA_LANGUAGES else "other")]
    for tok in doc:
        t = tok.text
        if t in _KEEP_PUNCT:
            out.append(_KEEP_PUNCT[t])
        elif tok.is_punct or tok.is_space:
            continue
        elif t.startswith("zz"):
            out.append(t)
        elif t.isascii() and t.isdigit():
            out.append(_count_token(int(t)) if len(t) <= 7 else "zzlongnum")
        elif _MIXED.match(t):
            out.append("zzcode")
        else:
            out.append(strip_accents(lemmas.get(t, t)))
    return out


def lemmas_used(language: str, texts: Iterable[str]) -> dict[str, str]:
    """The part of the full lemma table that can map a word onto a lemma occurring in `texts`."""
    full = full_lemma_table(language)
    if not full:
        return {}
    seen: set[str] = set()
    for text in texts:
        for tok in get_nlp(language).tokenizer(prepass(text)):
            seen.add(full.get(tok.text, tok.text))
    return {w: lemma for w, lemma in full.items() if lemma in seen}


def make_inputs(languages: Sequence[str], texts: Sequence[str]) -> np.ndarray:
    """The model input: an (n, 2) object array of (language, text) rows."""
    if len(languages) != len(texts):
        raise ValueError("languages and texts differ in length")
    arr = np.empty((len(texts), 2), dtype=object)
    arr[:, 0] = list(languages)
    arr[:, 1] = list(texts)
    return arr


class CompactTfidfVectorizer(TfidfVectorizer):
    """A TfidfVectorizer whose saved state keeps the vocabulary as one string array.

    skops writes a dict as one node per entry, which made a 60k-term vocabulary 30 MB and 7 s to load;
    an array of terms (position = column) is a single numpy blob.
    """

    def __getstate__(self) -> dict:
        # a copy: object.__getstate__ hands out the live __dict__
        state = dict(super().__getstate__())
        vocab = state.pop("vocabulary_", None)
        if vocab is not None:
            terms = [""] * len(vocab)
            for term, col in vocab.items():
                terms[col] = term
            state["vocabulary_terms_"] = np.array(terms, dtype=str)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        terms = state.pop("vocabulary_terms_", None)
        if terms is not None:
            state["vocabulary_"] = {str(t): i for i, t in enumerate(terms.tolist())}
        super().__setstate__(state)


class SpacyAnalyzer(TransformerMixin, BaseEstimator):
    """Turns (language, text) rows into space-joined lemma/shape token strings.

    Learned: `lemmas_`, per language the entries of spacy-lookups-data's lemma_lookup table whose lemma occurs
    in the training texts. Training texts are analysed exactly as with the full table; a word the pruned
    table lacks would have been mapped onto a lemma no feature knows.
    """

    def __init__(self, max_chars: int = MAX_CHARS) -> None:
        self.max_chars = max_chars

    def fit(self, X: Iterable, y: object = None) -> "SpacyAnalyzer":
        """Keep the lemma table entries that matter for the training texts."""
        rows = _rows(X)
        self.lemmas_ = {lang: lemmas_used(lang, (str(t)[: self.max_chars] for l, t in rows if l == lang))
                        for lang in LEMMA_LANGUAGES}
        return self

    def transform(self, X: Iterable) -> np.ndarray:
        """One token string per row."""
        lemmas = self.__dict__.get("lemmas_")
        if lemmas is None:
            raise NotFittedError("SpacyAnalyzer is not fitted")
        return np.array([" ".join(analyse(str(lang), str(text)[: self.max_chars], lemmas.get(str(lang))))
                         for lang, text in _rows(X)], dtype=object)

    def __getstate__(self) -> dict:
        # as string arrays: skops writes a dict as one node per entry (slow to load for 100k entries)
        state = dict(super().__getstate__())
        lemmas = state.pop("lemmas_", None)
        if lemmas is not None:
            state["lemma_words_"] = {k: np.array(list(v.keys()), dtype=str) for k, v in lemmas.items()}
            state["lemma_lemmas_"] = {k: np.array(list(v.values()), dtype=str) for k, v in lemmas.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        words, lemmas = state.pop("lemma_words_", None), state.pop("lemma_lemmas_", None)
        if words is not None and lemmas is not None:
            state["lemmas_"] = {k: dict(zip(words[k].tolist(), lemmas[k].tolist())) for k in words}
        super().__setstate__(state)


def _rows(X: Iterable) -> np.ndarray:
    rows = np.asarray(X, dtype=object)
    if rows.ndim != 2 or rows.shape[1] != 2:
        raise ValueError("expected rows of (language, text); build them with make_inputs()")
    return rows


def build_features(word_ngrams: tuple[int, int] = (1, 2), char_ngrams: tuple[int, int] | None = (2, 5),
                   min_df: int = 2, max_features: int | None = 40000) -> Pipeline:
    """The feature pipeline: spaCy analysis, then word (+ char) n-gram TF-IDF side by side."""
    parts: list[tuple[str, TfidfVectorizer]] = [
        ("word", CompactTfidfVectorizer(token_pattern=r"\S+", lowercase=False, ngram_range=word_ngrams,
                                 sublinear_tf=True, min_df=min_df, max_features=max_features,
                                 dtype=np.float32)),
    ]
    if char_ngrams is not None:
        parts.append(("char", CompactTfidfVectorizer(analyzer="char_wb", lowercase=False, ngram_range=char_ngrams,
                                              sublinear_tf=True, min_df=min_df, max_features=max_features,
                                              dtype=np.float32)))
    return Pipeline([("analyse", SpacyAnalyzer()), ("tfidf", FeatureUnion(parts))])
