"""End-to-end triage throughput on one core: raw RFC 822 bytes in, the CONTRACT.md record out.

The path is the one `triagebot triage` takes for each input: `normalize.from_raw` (MIME, charsets, HTML, quotes,
signatures, attachments), `Pipeline.run` (disposition, language, customer, classify, blast radius, severity) and
`pipeline.triage_record`. Reading the file is left out. The messages are a mix of typical support mail:

* the project's demo e-mails (samples/*.eml; the Slack samples are not e-mail and are left out),
* the e-mail messages of the independent evaluation set (training/eval/independent.jsonl) rendered as RFC 822
  mails (plain text, or text/html for the HTML ones), with the Date/From/To/Message-ID a mail client writes,
* a few real multipart / HTML mails from ../shared/corpora/email-raw (when present).

Before measuring, the pipeline triages the training data's e-mails (other writers, same kind of mail), so models
are loaded and the word caches hold what a worker's would after a while; then each measured message is seen for
the first time, as in service. See measure() for the passes.
"""
from __future__ import annotations

import cProfile
import io
import json
import math
import pstats
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from pathlib import Path

from triagebot.bench.paths import ROOT, CoreMeter, shared_dir

SAMPLES_DIR = ROOT / "samples"
EVAL_FILE = ROOT / "training" / "eval" / "independent.jsonl"
DATA_DIR = ROOT / "training" / "data"
# real mails with multipart/alternative, quoted-printable, an HTML-only body and a PDF attachment
REAL_MAILS = ("flanker/multi-received-headers.eml", "flanker/quoted-printable.eml", "flanker/long-links.eml",
              "flanker/attached-pdf.eml")
EMAIL_RAW_SUBDIR = Path("corpora") / "email-raw"


@dataclass
class Corpus:
    """The messages (name, raw bytes) and where they came from."""

    items: list[tuple[str, bytes]] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def add(self, source: str, name: str, raw: bytes) -> None:
        self.items.append((name, raw))
        self.sources[source] = self.sources.get(source, 0) + 1


def render_email(rec: dict, i: int) -> bytes:
    """One evaluation record as the mail its writer would have sent."""
    scenario = str(rec.get("scenario") or "customer")
    domain = (scenario.split("-")[1] if scenario.count("-") >= 1 else scenario) + ".example"
    writer = str(rec.get("writer") or "user")
    m = EmailMessage()
    m["From"] = f"{writer.replace('-', ' ').title()} <{writer}@{domain}>"
    m["To"] = "support@support.example.net"
    if rec.get("subject"):
        m["Subject"] = rec["subject"]
    m["Message-ID"] = f"<{rec.get('id', i)}.{i}@{domain}>"
    m["Date"] = format_datetime(datetime(2026, 11, 23, 8, 0, tzinfo=timezone.utc) + timedelta(minutes=7 * i))
    m.set_content(rec.get("body") or "", subtype="html" if rec.get("html") else "plain")
    return bytes(m)


def build_corpus(samples_dir: Path = SAMPLES_DIR, eval_file: Path = EVAL_FILE, shared: Path | None = None,
                 limit: int | None = None) -> Corpus:
    """The mix of typical e-mails; `limit` caps the evaluation messages (every n-th, so all languages stay)."""
    c = Corpus()
    if samples_dir.is_dir():
        for p in sorted(samples_dir.glob("*.eml")):
            c.add("samples", p.name, p.read_bytes())
    else:
        c.skipped.append(f"demo samples (not found at {samples_dir})")
    if eval_file.is_file():
        recs = [json.loads(x) for x in eval_file.read_text(encoding="utf-8").splitlines() if x.strip()]
        recs = [r for r in recs if r.get("channel", "email") == "email"]
        if limit:
            recs = recs[::max(1, len(recs) // limit)][:limit]
        for i, r in enumerate(recs):
            c.add("eval rendered", str(r.get("id", i)), render_email(r, i))
    else:
        c.skipped.append(f"evaluation messages (not found at {eval_file})")
    raw_dir = shared_dir(shared) / EMAIL_RAW_SUBDIR
    missing = [x for x in REAL_MAILS if not (raw_dir / x).is_file()]
    for x in REAL_MAILS:
        if x not in missing:
            c.add("email-raw", x, (raw_dir / x).read_bytes())
    if missing:
        c.skipped.append(f"{len(missing)} of {len(REAL_MAILS)} real mails (not found under {raw_dir})")
    return c


class _Timed:
    """A pipeline step with a stopwatch; the pipeline sees the same name and the same result."""

    def __init__(self, step, spent: dict[str, float], ran: dict[str, int]) -> None:
        self.step, self.name, self.spent, self.ran = step, step.name, spent, ran

    def __call__(self, message, triage):
        t = time.perf_counter()
        out = self.step(message, triage)
        self.spent[self.name] += time.perf_counter() - t
        self.ran[self.name] += 1
        return out


def warm_up_mails(data_dir: Path = DATA_DIR, limit: int | None = None) -> list[bytes]:
    """The training data's e-mails rendered like the evaluation ones: a worker's vocabulary before the measurement."""
    recs: list[dict] = []
    for path in sorted(Path(data_dir).glob("*.jsonl")) if Path(data_dir).is_dir() else []:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("channel", "email") == "email":
                recs.append(rec)
    if limit and len(recs) > limit:
        recs = recs[::len(recs) // limit][:limit]
    return [render_email(r, i) for i, r in enumerate(recs)]


def _pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def _profile(one, raws: list[bytes], top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for raw in raws:
        one(raw)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def profile(corpus: Corpus, settings=None, top: int = 25) -> str:
    """cProfile listing (cumulative, `top` lines) of one pass over the corpus, after an unprofiled pass."""
    from triagebot.errors import InputError
    from triagebot.normalize import from_raw as normalize
    from triagebot.pipeline import Pipeline, triage_record
    from triagebot.settings import Settings

    pipeline = Pipeline.default(settings or Settings.load())

    def one(raw: bytes) -> None:
        try:
            message = normalize("email", raw)
        except InputError:
            return
        triage_record(message, pipeline.run(message))

    raws = [raw for _, raw in corpus.items]
    for raw in raws:
        one(raw)
    return _profile(one, raws, top)


def measure(corpus: Corpus, settings=None, passes: int = 5, profile_top: int = 0,
            warm_up: list[bytes] | None = None, cpu: int | None = None) -> dict:
    """msg/s, per-message p50/p99 and the per-step breakdown over the corpus, in this process (pin it first).

    1. Warm-up on `warm_up` (other messages: models loaded, the word caches of a worker that has seen mail).
    2. First sight: one pass over the corpus, each step timed with perf_counter (about 1 µs of clock reads per
       message): the headline msg/s, p50/p99 and the breakdown. Messages seen for the first time, as in service.
    3. Repeat: passes - 1 more passes without instrumentation; every word of them is then in the caches, so this
       is an upper bound, reported beside the headline.
    """
    from triagebot.errors import InputError
    from triagebot.normalize import from_raw as normalize
    from triagebot.pipeline import Pipeline, triage_record
    from triagebot.settings import Settings

    settings = settings or Settings.load()
    pipeline = Pipeline.default(settings)
    raws = [raw for _, raw in corpus.items]
    n = len(raws)
    if not n:
        raise ValueError("no messages to triage")

    def one(raw: bytes) -> None:
        try:
            message = normalize("email", raw)
        except InputError:   # `triagebot triage` prints these as errors; they still cost time
            return
        triage_record(message, pipeline.run(message))

    t0 = time.perf_counter()
    for raw in warm_up or ():
        one(raw)
    if not warm_up:
        one(raws[0])        # at least the models loaded; caches otherwise empty
    warm_s = time.perf_counter() - t0

    # first sight, instrumented
    spent: dict[str, float] = defaultdict(float)
    ran: dict[str, int] = defaultdict(int)
    timed = Pipeline(tuple(_Timed(s, spent, ran) for s in pipeline.steps))
    errors: dict[str, str] = {}
    dispositions: dict[str, int] = defaultdict(int)
    per_msg: list[float] = []
    pc = time.perf_counter
    meter = CoreMeter(cpu)
    w0, c0 = pc(), time.process_time()
    for name, raw in corpus.items:
        t0 = pc()
        try:
            message = normalize("email", raw)
        except InputError as e:
            t1 = pc()
            spent["normalize"] += t1 - t0
            ran["normalize"] += 1
            per_msg.append(t1 - t0)
            errors[name] = str(e)
            continue
        t1 = pc()
        tri = timed.run(message)
        t2 = pc()
        triage_record(message, tri)
        t3 = pc()
        spent["normalize"] += t1 - t0
        spent["pipeline"] += t2 - t1
        spent["record"] += t3 - t2
        ran["normalize"] += 1
        ran["pipeline"] += 1
        ran["record"] += 1
        per_msg.append(t3 - t0)
        dispositions[tri.disposition or "none"] += 1
    first_wall, first_cpu = pc() - w0, time.process_time() - c0
    core_first = meter.stop()

    step_names = [s.name for s in pipeline.steps]
    order = ["normalize", *step_names, "pipeline_other", "record"]
    spent["pipeline_other"] = max(0.0, spent.pop("pipeline", 0.0) - sum(spent[s] for s in step_names))
    ran["pipeline_other"] = ran.pop("pipeline", 0)
    whole = sum(spent[k] for k in order) or float("nan")
    steps = {k: {"us_per_message": round(spent[k] / n * 1e6, 1), "share": round(spent[k] / whole, 4),
                 "ran_on": ran[k]} for k in order}

    # repeat passes, clean
    repeat_wall: list[float] = []
    repeat_cpu: list[float] = []
    meter = CoreMeter(cpu)
    for _ in range(max(0, passes - 1)):
        w, c = pc(), time.process_time()
        for raw in raws:
            one(raw)
        repeat_wall.append(pc() - w)
        repeat_cpu.append(time.process_time() - c)
    core_repeat = meter.stop() if repeat_wall else None

    profile = _profile(one, raws, profile_top) if profile_top else None

    ms = sorted(t * 1e3 for t in per_msg)
    return {
        "messages": n,
        "sources": dict(corpus.sources),
        "mean_bytes": round(statistics.mean(len(r) for r in raws)),
        "dispositions": dict(dispositions),
        "errors": errors,
        "warm_up_messages": len(warm_up or ()),
        "warm_up_s": round(warm_s, 2),
        "passes": max(1, passes),
        "msg_per_s": round(n / first_wall, 1),
        "msg_per_s_cpu": round(n / first_cpu, 1) if first_cpu > 0 else None,
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(_pct(ms, 0.99), 3),
        "max_ms": round(ms[-1], 3),
        "repeat_msg_per_s": round(n / min(repeat_wall), 1) if repeat_wall else None,
        "repeat_msg_per_s_cpu": round(n * len(repeat_cpu) / sum(repeat_cpu), 1) if sum(repeat_cpu) > 0 else None,
        "core_first_sight": core_first,     # what else ran on the pinned CPU meanwhile (shares of its time)
        "core_repeat": core_repeat,
        "steps": steps,
        "slowest_step": max(order, key=lambda k: spent[k]),
        "profile": profile,
    }
