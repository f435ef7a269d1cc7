"""Language identification for triage: en / sv / es / other, fast enough for every chat line.

`detect(text, hint=None, locale=None) -> (language, confidence)`.

The model (built by `python -m triagebot.langid.build`, stored in models/langid/langid.npz) is a
naive Bayes over words. A word's log-probability under each language mixes its frequency in that
language with a character 5-gram model, so a known word ("funkar") is strong evidence and an
unknown one ("lokalförsörjningsnämndens", "pequeos") is still judged by its spelling. Norwegian,
Danish, German and other languages are modelled too, so they are rejected as `other` instead of
being pushed into the nearest of en/sv/es; they start with a lower prior so a short, ambiguous
text stays in scope. The sender's earlier language (`hint`) and the Slack locale add to the prior;
they never override clear evidence. Technical words shared by all languages (APN, roaming,
firmware, ...) and short all-capital acronyms are ignored when the text has other words.
"""
from __future__ import annotations

import json
import math
import re
import threading
import unicodedata
from pathlib import Path
import numpy as np

__all__ = ["detect", "scores", "tokenize", "Model", "MODEL_PATH", "LANGUAGES"]

MODEL_PATH = Path(__file__).resolve().parents[2] / "models" / "langid" / "langid.npz"
LANGUAGES = ("en", "sv", "es", "other")

BOS, EOS = "^", "$"          # word boundaries in n-gram keys (never letters, so never in a word)
NGRAM_STEP = 0.1             # quantization step (nats) of the n-gram log-probabilities
WORD_STEP = 0.05             # quantization step of the word Zipf frequencies
MAX_WORDS = 200              # longer texts are judged on their first 200 words
ACRONYM_MAX = 5              # "APN", "SIM", "NOC": all-capital words up to this length are neutral

_CHUNK = re.compile(r"[\w'’]+")
_LN10 = math.log(10.0)


def _words(text: str) -> list[tuple[str, bool]]:
    """(lower-cased word, is_acronym) for each run of letters; runs touching digits are dropped."""
    out = []
    for m in _CHUNK.finditer(unicodedata.normalize("NFC", text)):
        chunk = m.group().replace("’", "'").strip("'")
        if not chunk or not chunk.replace("'", "").isalpha():
            continue  # identifiers, versions, snake_case: not language
        acronym = chunk.isupper() and len(chunk) <= ACRONYM_MAX and len(chunk) > 1
        out.append((chunk.lower(), acronym))
    return out


def tokenize(text: str) -> list[str]:
    """Lower-cased words of a text as the model sees them."""
    return [w for w, _ in _words(text)]


def _lang_code(value: str | None) -> str | None:
    """'sv-SE' / 'sv_SE' / 'nb' / 'nn-NO' -> model language code (Norwegian variants -> 'no')."""
    if not value:
        return None
    code = re.split(r"[-_.@]", value.strip().lower(), maxsplit=1)[0]
    return "no" if code in ("nb", "nn", "no") else code


class Model:
    """The loaded tables and the scoring function."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.meta = json.loads(bytes(arrays["meta"]).decode("utf-8"))
        self.langs: tuple[str, ...] = tuple(self.meta["langs"])
        self.in_scope = np.array([lang in LANGUAGES for lang in self.langs])
        self.order = int(self.meta["order"])
        self.ngrams = {k: i for i, k in enumerate(_unblob(arrays["ngram_keys"]))}
        self.ngram_lp = -arrays["ngram_q"].astype(np.float32) * np.float32(NGRAM_STEP)
        self.ctxs = {k: i for i, k in enumerate(_unblob(arrays["ctx_keys"]))}
        self.ctx_lp = -arrays["ctx_q"].astype(np.float32) * np.float32(NGRAM_STEP)
        self.words = {k: i for i, k in enumerate(_unblob(arrays["word_keys"]))}
        lam = float(self.meta["word_lambda"])
        zipf = arrays["word_q"].astype(np.float32) * np.float32(WORD_STEP)
        with np.errstate(divide="ignore"):
            # log(lambda * freq); -inf where the word is not listed for a language
            self.word_lp = np.where(arrays["word_q"] > 0, (zipf - 9.0) * _LN10 + math.log(lam), -np.inf).astype(np.float32)
        self.char_weight = np.float32(math.log(1.0 - lam))
        self.alphabet = frozenset(k for k in self.ngrams if len(k) == 1)
        self.neutral = frozenset(self.meta["neutral_words"])
        self.base_prior = np.where(self.in_scope, 0.0, float(self.meta["prior_other"])).astype(np.float64)
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Model":
        return cls(arrays)

    @classmethod
    def load(cls, path: Path = MODEL_PATH) -> "Model":
        """Load a model file written by triagebot.langid.build."""
        with np.load(path, allow_pickle=False) as z:
            return cls({k: z[k] for k in z.files})

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "unknown"))

    # -- scoring ---------------------------------------------------------------------------------
    def _char_lp(self, word: str) -> np.ndarray:
        """log P(word | language) under each language's character model."""
        s = BOS + word + EOS
        rows, ctx = [], []
        ngrams, ctxs, order = self.ngrams, self.ctxs, self.order
        for i in range(1, len(s)):
            for n in range(min(order, i + 1), 0, -1):
                g = s[i - n + 1:i + 1]
                r = ngrams.get(g)
                if r is not None:
                    rows.append(r)
                    break
                if n > 1:
                    c = ctxs.get(g[:-1])
                    if c is not None:
                        ctx.append(c)  # context known, letter never followed it: back-off penalty
        lp = self.ngram_lp[rows].sum(axis=0)
        if ctx:
            lp = lp + self.ctx_lp[ctx].sum(axis=0)
        return lp

    def _word_lp(self, word: str) -> np.ndarray:
        """log P(word | language): frequency-list mixture with the character model (cached)."""
        v = self._cache.get(word)
        if v is None:
            char = self._char_lp(word) + self.char_weight
            r = self.words.get(word)
            v = char if r is None else np.logaddexp(self.word_lp[r], char)
            if len(self._cache) < 200_000:
                self._cache[word] = v
        return v

    def prior(self, hint: str | None = None, locale: str | None = None) -> np.ndarray:
        """Log-prior per language: rejected languages start lower; hint and locale add to it."""
        p = self.base_prior.copy()
        h = _lang_code(hint)
        if h == "other":
            p[~self.in_scope] += self.meta["hint_boost"]
        elif h in self.langs:
            p[self.langs.index(h)] += self.meta["hint_boost"]
        loc = _lang_code(locale)
        if loc in self.langs:
            boost = self.meta["locale_boost_en"] if loc == "en" else self.meta["locale_boost"]
            p[self.langs.index(loc)] += boost
        return p

    def log_scores(self, text: str, hint: str | None = None, locale: str | None = None) -> tuple[np.ndarray, int]:
        """Unnormalized log-posterior per model language, and the number of words used."""
        words = _words(text)
        keep = [w for w, acro in words if not acro and w not in self.neutral]
        if not keep:  # nothing but technical words: judge those rather than nothing
            keep = [w for w, _ in words]
        keep = [w for w in keep if len(w) <= 30][:MAX_WORDS]
        total = self.prior(hint, locale)
        if keep:
            total = total + np.sum([self._word_lp(w) for w in keep], axis=0, dtype=np.float64)
        return total, len(keep)

    def posteriors(self, text: str, hint: str | None = None, locale: str | None = None) -> dict[str, float]:
        """Posterior probability of each model language (sums to 1)."""
        lp, _ = self.log_scores(text, hint, locale)
        p = np.exp(lp - lp.max())
        p /= p.sum()
        return {lang: float(v) for lang, v in zip(self.langs, p)}

    def detect(self, text: str, hint: str | None = None, locale: str | None = None) -> tuple[str, float]:
        """(en|sv|es|other, confidence in [0, 1]) for a text."""
        lp, n = self.log_scores(text, hint, locale)
        if n == 0 or self._mostly_foreign_script(text):
            if n and self._mostly_foreign_script(text):
                return "other", 0.9
            # no letters at all: fall back to the thread's / user's language if we know one
            best = int(np.argmax(lp))
            if (hint or locale) and self.langs[best] in LANGUAGES:
                p = np.exp(lp - lp.max())
                return self.langs[best], round(float(p[best] / p.sum()), 3)
            return "other", 0.0
        p = np.exp(lp - lp.max())
        p /= p.sum()
        best = int(np.argmax(lp))
        label = self.langs[best]
        if not self.in_scope[best]:
            return "other", round(float(p[~self.in_scope].sum()), 3)
        return label, round(float(p[best]), 3)

    def _mostly_foreign_script(self, text: str) -> bool:
        """True when most letters are outside the alphabets of all modelled languages."""
        letters = [c for c in text.lower() if c.isalpha()]
        if not letters:
            return False
        foreign = sum(c not in self.alphabet for c in letters)
        return foreign * 2 > len(letters)


def _unblob(blob: np.ndarray) -> list[str]:
    return bytes(blob).decode("utf-8").split("\n") if len(blob) else []


_model: Model | None = None
_model_lock = threading.Lock()


def get_model() -> Model:
    """The default model, loaded once on first use."""
    global _model
    if _model is None:
        with _model_lock:
            if _model is None:
                _model = Model.load(MODEL_PATH)
    return _model


def detect(text: str, hint: str | None = None, locale: str | None = None) -> tuple[str, float]:
    """Language of a text: ("en" | "sv" | "es" | "other", confidence in [0, 1])."""
    return get_model().detect(text, hint, locale)


def scores(text: str, hint: str | None = None, locale: str | None = None) -> dict[str, float]:
    """Posterior per modelled language (en, sv, es, no, da, de, ...), for explanations."""
    return get_model().posteriors(text, hint, locale)
