"""The language step: en / sv / es / other for the message, from its subject and new text."""
from __future__ import annotations

from pathlib import Path

from triagebot.langid import MODEL_PATH, Model, get_model
from triagebot.model import Message, Triage

MODEL_KEY = "langid"   # the key of this step's model in Triage.model_versions
TOP_SCORES = 3         # how many language posteriors the trail note shows


class LanguageStep:
    """Detects the language of the new text, using the sender's earlier language and Slack locale as a prior."""

    name = "language"

    def __init__(self, models_dir: Path | str | None = None, model: Model | None = None) -> None:
        path = Path(models_dir) / "langid" / MODEL_PATH.name if models_dir else MODEL_PATH
        # the default file is shared with triagebot.langid.detect; another directory gets its own copy
        self._model = model or (None if path == MODEL_PATH else Model.load(path))

    @property
    def model(self) -> Model:
        return self._model or get_model()

    def warm_up(self) -> str:
        """Load the model now (at worker start) rather than on the first message; its version."""
        return self.model.version

    def __call__(self, message: Message, triage: Triage) -> Triage:
        body = message.text if message.text.strip() else message.quoted
        text = "\n".join(part for part in (message.subject or "", body) if part)
        model = self.model
        language, confidence = model.detect(text, hint=message.language_hint, locale=message.user_locale)
        posteriors = model.posteriors(text, hint=message.language_hint, locale=message.user_locale)
        top = sorted(posteriors.items(), key=lambda kv: -kv[1])[:TOP_SCORES]
        detail = ", ".join(f"{lang} {p:.2f}" for lang, p in top)
        if message.language_hint:
            detail += f"; hint {message.language_hint}"
        if message.user_locale:
            detail += f"; locale {message.user_locale}"
        if not message.text.strip():
            detail += "; judged on the quoted text"
        t = triage.with_(
            language=language,
            confidence={**dict(triage.confidence), "language": confidence},
            model_versions={**dict(triage.model_versions), MODEL_KEY: model.version},
        )
        return t.note(self.name, language, detail)
