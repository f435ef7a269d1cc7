"""Atheris (libFuzzer) target for the e-mail side: parse_email + DispositionStep + split_reply, and the XLSX reader.

    .venv/bin/python fuzz/fuzz_email.py -max_total_time=60            # corpus: fuzz/corpus, seeded on first run
    .venv/bin/python fuzz/fuzz_email.py -max_total_time=600 -jobs=2 -workers=2
    .venv/bin/python fuzz/fuzz_email.py crash-<sha1>                  # replay one finding

Every input must end as a Message that passes the checks below or as an InputError; anything else (another
exception, a failed check) is a finding: libFuzzer writes it to crash-<sha1> in the working directory. A
hang is an input that runs longer than -timeout (20 s here unless given), a memory blow-up one that passes
-rss_limit_mb (1536 here unless given).

Needs atheris: `.venv/bin/pip install atheris==3.0.0` (a manylinux wheel for CPython 3.11, no build step).
For the lead: add "atheris==3.0.0" to [project.optional-dependencies] test in pyproject.toml; tests/test_fuzz.py
skips with that reason when it is missing.

The corpus is seeded from ../shared/corpora/email-raw (mails up to SEED_MAX_BYTES) plus a few small crafted
seeds (nested multipart, a workbook, HTML, deep quotes), when fuzz/corpus is empty or absent.
"""
from __future__ import annotations

import io
import os
import re
import sys
import zipfile
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CORPUS_SOURCE = ROOT.parent / "shared" / "corpora" / "email-raw"
DEFAULT_CORPUS = Path(__file__).resolve().parent / "corpus"
SEED_MAX_BYTES = 64_000
DEFAULT_ARGS = ["-timeout=20", "-rss_limit_mb=1536", "-max_len=65536"]

# instrument our code and the pure-Python stdlib parsers it drives, so coverage guides the mutations
with atheris.instrument_imports(include=["triagebot", "email", "html", "zipfile", "quopri"]):
    from triagebot.errors import InputError
    from triagebot.model import DISPOSITIONS, Message, Triage
    from triagebot.normalize.attachments import MAX_TEXT_CHARS, xlsx_text
    from triagebot.normalize.email import MAX_BODY_CHARS, MAX_HEADERS, parse_email
    from triagebot.normalize.quotes import split_reply
    from triagebot.steps.disposition import DispositionStep

STEP = DispositionStep()
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _check(m: Message) -> None:
    """What every Message from parse_email must be (the same checks as tests/test_hostile_input.py)."""
    assert isinstance(m, Message) and m.source == "email"
    assert len(m.text) <= MAX_BODY_CHARS and len(m.headers) <= MAX_HEADERS
    texts = [m.text, m.subject, m.sender, m.sender_name, m.message_id, m.quoted, m.signature, *m.recipients,
             *m.references, *m.in_reply_to, *(x for kv in m.headers for x in kv),
             *(x for a in m.attachments for x in (a.filename, a.content_type, a.text))]
    for t in texts:
        assert t is None or not _UNSTORABLE.search(t), f"unstorable character in {t[:80]!r}"
    assert all(a.text is None or len(a.text) <= MAX_TEXT_CHARS for a in m.attachments)
    t = STEP(m, Triage())
    assert t.disposition in DISPOSITIONS


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the name atheris expects
    """One input: a raw mail; a zip is also read as a workbook."""
    if data[:2] == b"PK":
        text = xlsx_text(data)
        assert text is None or (isinstance(text, str) and len(text) <= MAX_TEXT_CHARS)
    try:
        m = parse_email(data)
    except InputError as e:
        assert "\n" not in str(e)
        return
    _check(m)
    parts = split_reply(m.quoted, sender_name=m.sender_name)   # the quoted part as a body of its own
    assert isinstance(parts.new, str)


def _crafted_seeds() -> dict[str, bytes]:
    head = b"From: Anna <anna@example.se>\r\nTo: support@example.net\r\nSubject: SIMs down\r\nMIME-Version: 1.0\r\n"
    nested = head + b'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n' + b"".join(
        b'--b%d\r\nContent-Type: multipart/alternative; boundary="b%d"\r\n\r\n' % (i, i + 1) for i in range(8)) + \
        b"--b8\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nAll down\r\n--b8--\r\n"
    book = io.BytesIO()
    with zipfile.ZipFile(book, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("xl/workbook.xml", '<workbook xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/'
                                      'relationships"><sheets><sheet name="S" r:id="rId1"/></sheets></workbook>')
        z.writestr("xl/_rels/workbook.xml.rels", '<Relationships><Relationship Id="rId1" '
                                                 'Target="worksheets/sheet1.xml"/></Relationships>')
        z.writestr("xl/worksheets/sheet1.xml", '<worksheet><sheetData><row r="1"><c r="A1" t="s"><v>0</v></c>'
                                               '<c r="C1" s="1"><v>45000</v></c></row></sheetData></worksheet>')
        z.writestr("xl/sharedStrings.xml", "<sst><si><t>8946000000000000001</t></si></sst>")
        z.writestr("xl/styles.xml", '<styleSheet><cellXfs><xf numFmtId="0"/><xf numFmtId="14"/></cellXfs></styleSheet>')
    return {
        "crafted-nested.eml": nested,
        "crafted-html.eml": head + b"Content-Type: text/html; charset=iso-8859-1\r\n\r\n<div><blockquote><p>Hej "
                            b"\xe5<br><table><tr><td>a<td>b</table><!-- x --><script>x()</script>",
        "crafted-quotes.eml": head + b"\r\nStill down.\r\n\r\nOn Mon, 3 Mar 2025, Bob <b@x.se> wrote:\r\n"
                              + b"".join(b">" * k + b" level\r\n" for k in range(1, 12)) + b"-- \r\nAnna\r\n",
        "crafted-params.eml": head + b"Content-Type: text/plain; name*0*=utf-8''%E5; name*1=\"a;b\\\".csv\"; "
                              b"charset*=utf-8''utf-8\r\nContent-Disposition: attachment\r\n\r\nICCID 8946\r\n",
        "crafted-workbook.zip": book.getvalue(),
    }


def seed(corpus: Path) -> int:
    """Fill an empty corpus folder from the shared mails and the crafted seeds; how many files it now holds."""
    corpus.mkdir(parents=True, exist_ok=True)
    if any(corpus.iterdir()):
        return sum(1 for _ in corpus.iterdir())
    n = 0
    if CORPUS_SOURCE.is_dir():
        for p in sorted(CORPUS_SOURCE.rglob("*")):
            if p.is_file() and p.name not in ("LICENSE", "MANIFEST.tsv", "SOURCE.md") and p.parent.name != "mbox" \
                    and p.stat().st_size <= SEED_MAX_BYTES:
                (corpus / p.relative_to(CORPUS_SOURCE).as_posix().replace("/", "__")).write_bytes(p.read_bytes())
                n += 1
    for name, data in _crafted_seeds().items():
        (corpus / name).write_bytes(data)
        n += 1
    return n


def main(argv: list[str]) -> None:
    args = list(argv)
    inputs = [a for a in args[1:] if not a.startswith("-")]
    if not inputs:   # no corpus folder or crash file given: use (and seed) the default corpus
        seed(DEFAULT_CORPUS)
        args.append(str(DEFAULT_CORPUS))
    else:
        for a in inputs:
            if not os.path.isfile(a):
                seed(Path(a))
    for flag in DEFAULT_ARGS:
        if not any(a.startswith(flag.split("=")[0] + "=") for a in args):
            args.insert(1, flag)
    atheris.Setup(args, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
