"""`triagebot bench`: the report has every section with numbers, on a tiny input. No timing is asserted."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from triagebot import cli
from triagebot.bench import runner
from triagebot.bench.paths import SHARED_ENV
from triagebot.bench.triage import REAL_MAILS
from triagebot.langid import MODEL_PATH

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = len(list((ROOT / "samples").glob("*.eml")))
LINES = {
    "sentences": {"en": ["The trackers stopped sending data this morning.", "We need more SIM cards for the meters.",
                         "Please check the roaming settings for Germany."],
                  "sv": ["Mätarna har slutat skicka data sedan i morse.", "Vi behöver fler SIM-kort till larmen.",
                         "Kan ni kontrollera inställningarna för roaming?"],
                  "es": ["Los contadores no envian datos desde esta manana.", "Necesitamos mas tarjetas SIM.",
                         "Por favor revisen la configuracion del roaming."]},
    "word-pairs": {"en": ["water meters", "billing question", "network outage"],
                   "sv": ["inga larm", "fakturan stämmer"], "es": ["tarjetas nuevas", "sin cobertura"]},
    "single-words": {"en": ["yesterday", "question"], "sv": ["fakturan", "tyvärr"], "es": ["gracias", "tarjetas"]},
}
MULTIPART = (b"From: Ana Ruiz <ana@levante.example>\r\nTo: support@support.example.net\r\nSubject: Sin datos\r\n"
             b"Message-ID: <mp1@levante.example>\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n"
             b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHola, 20 parquimetros sin datos desde ayer.\r\n"
             b"--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Hola, <b>20 parquimetros</b> sin datos.</p>\r\n"
             b"--b1--\r\n")


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.fixture
def tiny_shared(tmp_path: Path) -> Path:
    shared = tmp_path / "shared"
    for kind, langs in LINES.items():
        d = shared / "corpora" / "lingua-langid-testdata" / kind
        d.mkdir(parents=True)
        for lang, lines in langs.items():
            (d / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    mail = shared / "corpora" / "email-raw" / REAL_MAILS[0]   # one real-mail slot filled, the others absent
    mail.parent.mkdir(parents=True)
    mail.write_bytes(MULTIPART)
    return shared


@pytest.mark.skipif(not MODEL_PATH.exists(), reason="language model absent")
def test_quick_bench_reports_every_section_with_numbers(tiny_shared, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(SHARED_ENV, raising=False)
    out = tmp_path / "bench.json"
    status = cli.main(["bench", "--quick", "--limit", "3", "--shared", str(tiny_shared), "--json", str(out)])
    assert status == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text(encoding="utf-8"))

    # language detection: the three lingua sets of the tiny input, ours and langdetect side by side
    sets = report["langid"]["sets"]
    for kind, langs in LINES.items():
        assert sets[kind]["n"] == sum(len(v) for v in langs.values())
        for who in ("ours", "langdetect"):
            assert all(is_number(sets[kind][who][k]) for k in ("accuracy", "median_us", "p95_us")), (kind, who)
            assert 0 <= sets[kind][who]["accuracy"] <= 1
    # classification cost and load
    c = report["classify"]
    assert c["messages"] == 3
    assert all(is_number(c["per_message_us"][k]) for k in ("mean", "median", "p95", "max"))
    assert is_number(c["load_only_s"]) and is_number(c["load_and_warm_up_s"])
    # fresh process: load time and memory with everything loaded
    s = report["startup"]
    assert "error" not in s, s
    assert all(is_number(s[k]) for k in ("import_s", "models_s", "spawn_to_ready_s", "peak_rss_mb"))
    assert s["rss_mb"]["after_triage"] > s["rss_mb"]["start"] > 0
    assert s["triaged"] >= 1 and s["errors"] == 0
    # throughput: 9 demo mails + 3 rendered evaluation mails + the one real multipart mail
    t = report["triage"]
    assert t["messages"] == SAMPLES + 3 + 1
    assert t["sources"]["email-raw"] == 1
    assert t["warm_up_messages"] == 3              # the training e-mails, capped by --limit too
    assert all(is_number(t[k]) and t[k] > 0 for k in ("msg_per_s", "p50_ms", "p99_ms"))
    assert t["p50_ms"] <= t["p99_ms"]
    assert list(t["steps"]) == ["normalize", "disposition", "language", "customer", "classify", "blast_radius",
                                "severity", "pipeline_other", "record"]
    assert all(is_number(v["us_per_message"]) for v in t["steps"].values())
    assert t["steps"]["classify"]["ran_on"] == t["dispositions"].get("case", 0)
    # every bar measured and judged, in the JSON and in the table
    assert {b["key"] for b in report["bars"]} == {b.key for b in runner.BARS}
    for b in report["bars"]:
        assert is_number(b["measured"]) and b["result"] in ("PASS", "FAIL"), b
        assert b["what"] in text
    for header in ("LANGUAGE DETECTION", "CLASSIFICATION", "START-UP AND MEMORY", "TRIAGE THROUGHPUT", "BARS"):
        assert header in text


def test_without_shared_folder_says_what_is_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(SHARED_ENV, raising=False)
    out = tmp_path / "bench.json"
    status = cli.main(["bench", "--quick", "--limit", "2", "--shared", str(tmp_path / "absent"), "--no-langdetect",
                       "--skip", "startup", "--skip", "classify", "--json", str(out)])
    assert status == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text(encoding="utf-8"))
    skipped = " ".join(report["skipped"])
    assert "lingua" in skipped and "real mails" in skipped and "langdetect" in skipped
    assert "SKIPPED" in text and "lingua" in text
    assert set(report["langid"]["sets"]) == {"own-slack-lines"}
    assert report["triage"]["sources"] == {"samples": SAMPLES, "eval rendered": 2}
    results = {b["key"]: b["result"] for b in report["bars"]}
    assert results["langid_sentences_accuracy"] == "SKIP" and results["rss_mb"] == "SKIP"
    assert results["triage_msg_per_s"] in ("PASS", "FAIL")


def test_bars_judge_the_figures():
    report = {"langid": {"sets": {"sentences": {"ours": {"accuracy": 0.99, "median_us": 300.0}}}},
              "startup": {"rss_mb": {"after_triage": 500.0}, "models_s": 1.99},
              "triage": {"msg_per_s": 300.0}}
    got = {b["key"]: b["result"] for b in runner.evaluate(report)}
    assert got["langid_sentences_accuracy"] == "FAIL"     # below 0.995
    assert got["langid_sentences_median_us"] == "PASS"    # <= 300 holds at 300
    assert got["rss_mb"] == "FAIL"                        # < 500 fails at 500
    assert got["models_load_s"] == "PASS"
    assert got["triage_msg_per_s"] == "PASS"              # >= 300 holds at 300
    assert got["langid_word-pairs_accuracy"] == "SKIP"
    assert got["cold_start_s"] == "SKIP"
