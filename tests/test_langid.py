"""Language identification: the accuracy bars on lingua's test files, rejection of neighbours, chat lines, priors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from triagebot import langid
from triagebot.langid import MODEL_PATH, Model, detect, scores, tokenize
from triagebot.langid.build import cut_quoted, delete_accents, strip_accents
from triagebot.model import Message, Triage
from triagebot.steps.language import LanguageStep

SHARED = Path(__file__).resolve().parents[2] / "shared"
LINGUA = SHARED / "corpora" / "lingua-langid-testdata"

# accuracy bars over en+sv+es of each lingua set (predicting `other` counts as wrong)
BARS = {"sentences": 0.995, "word-pairs": 0.95, "single-words": 0.82}


@pytest.fixture(scope="module")
def model() -> Model:
    if not MODEL_PATH.exists():
        pytest.skip(f"{MODEL_PATH} is absent: build it with `python -m triagebot.langid.build`")
    return Model.load(MODEL_PATH)


def lingua_lines(kind: str, lang: str) -> list[str]:
    path = LINGUA / kind / f"{lang}.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared folder sits beside the project root)")
    return [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.mark.parametrize("kind", list(BARS))
def test_lingua_accuracy_bar(model: Model, kind: str) -> None:
    right = total = 0
    for lang in ("en", "sv", "es"):
        lines = lingua_lines(kind, lang)
        right += sum(model.detect(x)[0] == lang for x in lines)
        total += len(lines)
    assert right / total >= BARS[kind], f"{kind}: {right}/{total} = {right / total:.4f} < {BARS[kind]}"


# Written for this test; none of these lines is in the training text of build.py.
NEIGHBOURS = {
    "no": [
        "Hei, vi har problemer med mobildata på alle bilene våre siden i går kveld.",
        "Kan dere se på hvorfor ruterne ikke kobler seg til nettet?",
        "Jeg har prøvd å starte enheten på nytt flere ganger, men det hjelper ikke.",
        "Takk for hjelpen, nå fungerer alt som det skal igjen.",
        "Vi trenger flere SIM-kort til det nye prosjektet vårt i Bergen.",
        "Hvorfor har regningen økt så mye denne måneden?",
        "Det er ingen dekning på hytta, selv om kartet deres viser god dekning.",
        "Kunden vår sier at målerne sluttet å sende data etter oppdateringen.",
        "Eg lurer på kvifor ruteren ikkje får kontakt med nettet lenger.",
        "Me har ikkje hatt straum på anlegget, og no kjem ikkje modemet opp att.",
        "Kan de hjelpe oss med å flytte abonnementa til ein ny konto?",
        "Alle einingane våre sluttar å sende data kvar natt.",
    ],
    "da": [
        "Hej, vi har problemer med mobildata på alle vores biler siden i går aftes.",
        "Kan I se på, hvorfor routerne ikke forbinder sig til nettet?",
        "Jeg har prøvet at genstarte enheden flere gange, men det hjælper ikke.",
        "Tak for hjælpen, nu fungerer alt, som det skal igen.",
        "Vi har brug for flere SIM-kort til vores nye projekt i Aarhus.",
        "Hvorfor er regningen steget så meget denne måned?",
        "Der er ingen dækning i sommerhuset, selvom jeres kort viser god dækning.",
        "Vores kunde siger, at målerne holdt op med at sende data efter opdateringen.",
    ],
    "de": [
        "Hallo, wir haben seit gestern Abend Probleme mit den mobilen Daten in allen Fahrzeugen.",
        "Können Sie bitte nachsehen, warum sich die Router nicht mit dem Netz verbinden?",
        "Ich habe das Gerät mehrmals neu gestartet, aber es hilft nicht.",
        "Danke für die Hilfe, jetzt funktioniert wieder alles.",
        "Wir brauchen weitere SIM-Karten für unser neues Projekt in Hamburg.",
        "Warum ist die Rechnung diesen Monat so stark gestiegen?",
        "Im Ferienhaus gibt es keinen Empfang, obwohl Ihre Karte gute Abdeckung zeigt.",
        "Unser Kunde sagt, dass die Zähler nach dem Update keine Daten mehr senden.",
    ],
}


@pytest.mark.parametrize("lang", list(NEIGHBOURS))
def test_neighbour_languages_are_other(model: Model, lang: str) -> None:
    lines = NEIGHBOURS[lang]
    wrong = [(x, model.detect(x)) for x in lines if model.detect(x)[0] != "other"]
    # nearly all: at most one miss per language, and never for Norwegian -> Swedish twice
    assert len(wrong) <= 1, wrong


def test_norwegian_is_not_swedish_even_with_a_swedish_locale(model: Model) -> None:
    text = "Hei, jeg får ikke koblet til nettet med det nye SIM-kortet, kan dere hjelpe meg?"
    assert model.detect(text, locale="sv-SE")[0] == "other"


SWEDISH_CHAT = [
    "hej, funkar inte",
    "APN:en är fel efter firmware-uppdateringen, kan ni kolla?",
    "roaming funkar inte i Norge, SIM-korten är aktiva i portalen",
    "vi gjorde reset på routern men fortfarande ingen data",
    "kan ni göra en reset av lösenordet till portalen?",
    "firmware uppdaterad, APN satt, roaming på, ändå inget",
    "modemet har ingen täckning sen i går",
    "tack, nu funkar det!",
]


@pytest.mark.parametrize("text", SWEDISH_CHAT)
def test_swedish_chat_with_english_tech_words_is_sv(model: Model, text: str) -> None:
    assert model.detect(text)[0] == "sv", model.posteriors(text)


SPANISH_PLAIN = [
    "hola, el router no tiene datos desde la actualizacion del firmware",
    "no funciona el roaming en Portugal, las SIM estan activas en el portal",
    "hemos hecho reset del modem pero sigue sin conexion",
    "buenos dias, necesitamos ayuda con la facturacion de este mes",
    "la configuracin del APN no es correcta",       # accents deleted, as in scraped text
    "quedo a la espera, gracias",
]


@pytest.mark.parametrize("text", SPANISH_PLAIN)
def test_spanish_without_accents_is_es(model: Model, text: str) -> None:
    assert model.detect(text)[0] == "es", model.posteriors(text)


def test_english_support_lines_are_en(model: Model) -> None:
    for text in ("no data on the trackers since the firmware update",
                 "please reset the APN on these SIMs", "thanks, it works now"):
        assert model.detect(text)[0] == "en", text


def test_hint_shifts_an_ambiguous_word(model: Model) -> None:
    # "data" is as much Swedish as English; the sender's earlier language decides
    assert model.detect("data", hint="sv")[0] == "sv"
    assert model.detect("data", hint="en")[0] == "en"
    # "final" is English and Spanish
    assert model.detect("final", hint="es")[0] == "es"
    assert model.detect("final", hint="en")[0] == "en"


def test_locale_shifts_an_ambiguous_word(model: Model) -> None:
    base = model.posteriors("hotel")
    shifted = model.posteriors("hotel", locale="es_ES")
    assert shifted["es"] > base["es"]
    assert model.detect("hotel", locale="es-ES")[0] == "es"


def test_hint_does_not_override_clear_evidence(model: Model) -> None:
    assert model.detect("hej, funkar inte", hint="en")[0] == "sv"
    assert model.detect("the modem does not connect since yesterday", hint="sv", locale="sv-SE")[0] == "en"
    assert model.detect("no tenemos datos en ninguno de los equipos", hint="en")[0] == "es"


def test_confidence_is_a_probability(model: Model) -> None:
    for text in ("hej", "data", "the quick fix worked", "Hallo, das geht nicht", "x"):
        lang, conf = model.detect(text)
        assert lang in langid.LANGUAGES
        assert 0.0 <= conf <= 1.0
    assert model.detect("tack så mycket för hjälpen med abonnemanget")[1] > 0.95
    post = model.posteriors("hej")
    assert abs(sum(post.values()) - 1.0) < 1e-6


def test_no_letters_and_foreign_scripts(model: Model) -> None:
    assert model.detect("") == ("other", 0.0)
    assert model.detect("8946070120004815525 +46701234567") == ("other", 0.0)
    assert model.detect("8946070120004815525", hint="sv")[0] == "sv"
    assert model.detect("Здравствуйте, у нас не работает интернет")[0] == "other"
    assert model.detect("インターネットが使えません")[0] == "other"


def test_module_detect_and_scores() -> None:
    if not MODEL_PATH.exists():
        pytest.skip(f"{MODEL_PATH} is absent")
    assert detect("hej, funkar inte") [0] == "sv"
    assert max(scores("buenos días").items(), key=lambda kv: kv[1])[0] == "es"


def test_tokenize_drops_identifiers_and_keeps_letters() -> None:
    assert tokenize("APN:et är fel, ICCID 8946070120004815525, fw 4.2.1") == ["apn", "et", "är", "fel", "iccid", "fw"]
    assert tokenize("don’t") == ["don't"]


def test_accent_variants() -> None:
    assert strip_accents("pequeños Gestión") == "pequenos Gestion"
    assert delete_accents("pequeños Gestión") == "pequeos Gestin"


def test_cut_quoted() -> None:
    body = "hej, funkar inte\n\nDen 3 mars 2026 skrev Support <s@x.se>:\n> Hello, please try again"
    assert cut_quoted(body).strip() == "hej, funkar inte"


def test_model_file_is_compact_and_versioned(model: Model) -> None:
    assert MODEL_PATH.stat().st_size < 8_000_000
    assert model.version.startswith("langid-")
    assert set(model.langs) >= {"en", "sv", "es", "no", "da", "de"}


def test_a_model_of_another_format_is_refused(model: Model, tmp_path: Path) -> None:
    with np.load(MODEL_PATH, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode("utf-8"))
    meta["format"] = 999
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(ValueError, match="format"):
        Model.load(tmp_path / "old.npz")


# -- the pipeline step --------------------------------------------------------------------------
def test_step_sets_language_confidence_and_trail(model: Model) -> None:
    step = LanguageStep(model=model)
    before = Triage(confidence={"disposition": 0.9})
    msg = Message(source="slack", text="funkar inte efter firmware-uppdateringen", user_locale="sv-SE")
    t = step(msg, before)
    assert t.language == "sv"
    assert 0.5 < t.confidence["language"] <= 1.0
    assert t.confidence["disposition"] == 0.9
    assert "language" not in before.confidence          # a new mapping, the old one untouched
    assert t.model_versions["langid"] == model.version
    entry = t.trail[-1]
    assert entry.step == "language" and entry.decision == "sv"
    assert "sv " in entry.detail and "locale sv-SE" in entry.detail


def test_step_reads_subject_and_falls_back_to_quoted_text(model: Model) -> None:
    step = LanguageStep(model=model)
    t = step(Message(source="email", text="", quoted="Hola, seguimos sin datos en los contadores."), Triage())
    assert t.language == "es"
    assert "quoted" in t.trail[-1].detail
    t = step(Message(source="email", subject="Ingen data på mätarna", text="8946070120004815525"), Triage())
    assert t.language == "sv"


def test_step_uses_the_language_hint(model: Model) -> None:
    step = LanguageStep(model=model)
    assert step(Message(source="slack", text="data?", language_hint="sv"), Triage()).language == "sv"
    assert step(Message(source="slack", text="data?", language_hint="en"), Triage()).language == "en"


def test_step_loads_from_a_models_dir(tmp_path: Path) -> None:
    if not MODEL_PATH.exists():
        pytest.skip(f"{MODEL_PATH} is absent")
    (tmp_path / "langid").mkdir()
    (tmp_path / "langid" / MODEL_PATH.name).write_bytes(MODEL_PATH.read_bytes())
    step = LanguageStep(models_dir=tmp_path)
    assert step.warm_up().startswith("langid-")
    assert step(Message(source="slack", text="hej, funkar inte"), Triage()).language == "sv"
