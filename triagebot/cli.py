"""The `triagebot` command and its subcommands."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Iterator

from triagebot.settings import Settings


def expand(paths: list[str]) -> Iterator[Path]:
    """Each path, a directory standing for its files in name order (CONTRACT.md)."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith("."))
        else:
            yield p


def read_input(path: Path) -> tuple[str, bytes]:
    """The channel and raw bytes of one input file; InputError when it cannot be read."""
    from triagebot.errors import InputError
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    if not raw.strip():
        raise InputError("empty file")
    if path.suffix.lower() == ".json" or (path.suffix.lower() != ".eml" and raw.lstrip()[:1] == b"{"):
        return "slack", raw
    return "email", raw


def _print(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, ensure_ascii=False), flush=True)
        return
    if "error" in obj:
        print(f"{obj['input']}: ERROR {obj['error']}", flush=True)
        return
    parts = [f"{k}={obj[k]}" for k in ("action", "case", "disposition", "language", "category", "service",
                                       "severity") if obj.get(k) is not None]
    br = obj.get("blast_radius")
    if br:
        parts.append(f"blast={br['tier']}/{br['estimate']}")
    print(f"{obj['input']}: " + " ".join(parts), flush=True)
    for line in obj.get("trail", []):
        print(f"    {line}", flush=True)


def cmd_triage(args: argparse.Namespace, settings: Settings) -> int:
    """Classify inputs without storing anything."""
    from triagebot.errors import InputError
    from triagebot.normalize import from_raw as normalize
    from triagebot.pipeline import Pipeline, triage_record
    pipeline = Pipeline.default(settings)
    status = 0
    for path in expand(args.paths):
        try:
            channel, raw = read_input(path)
            message = normalize(channel, raw)
            record = {"input": str(path), **triage_record(message, pipeline.run(message))}
        except InputError as e:
            record, status = {"input": str(path), "error": str(e)}, 1
        except Exception as e:  # a bug must not stop the other inputs, and never prints a traceback
            logging.getLogger(__name__).error("triage of %s failed", path, exc_info=True)
            record, status = {"input": str(path), "error": f"internal error: {type(e).__name__}: {e}".replace("\n", " ")}, 1
        _print(record, args.json)
    return status


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    """Run the whole pipeline on each input and store the result."""
    from triagebot.db import queue
    from triagebot.db.engine import open_db
    from triagebot.errors import InputError
    from triagebot.ingest import Processor
    from triagebot.pipeline import triage_record
    _engine, sessions = open_db(settings.database_url)
    processor = Processor(settings, sessions)
    status = 0
    for path in expand(args.paths):
        try:
            channel, raw = read_input(path)
        except InputError as e:
            _print({"input": str(path), "error": str(e)}, args.json)
            status = 1
            continue
        intake_id = queue.enqueue(sessions, channel, raw, origin=f"cli:{path}")
        item = queue.claim_one(sessions, intake_id, "cli")
        try:
            out = processor.process(item)
        except Exception as e:
            queue.mark_failed(sessions, intake_id, f"{type(e).__name__}: {e}", settings.max_attempts)
            logging.getLogger(__name__).error("ingest of %s failed", path, exc_info=True)
            _print({"input": str(path), "error": f"internal error: {type(e).__name__}: {e}".replace("\n", " ")}, args.json)
            status = 1
            continue
        if out.action == "error":
            _print({"input": str(path), "error": out.error}, args.json)
            status = 1
            continue
        record = {"input": str(path), "message_id": out.message.message_id, "action": out.action, "case": out.case}
        record.update({k: v for k, v in triage_record(out.message, out.triage).items() if k not in record})
        _print(record, args.json)
    return status


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Counts of messages, cases, queued and failed intake rows."""
    from triagebot.db import queue
    from triagebot.db.engine import open_db
    from triagebot.db.tables import Case, Intake, MessageRow
    from sqlalchemy import func, select
    _engine, sessions = open_db(settings.database_url)
    q = queue.counts(sessions)
    with sessions() as s:
        out = {"messages": s.scalar(select(func.count()).select_from(MessageRow)) or 0,
               "cases": s.scalar(select(func.count()).select_from(Case)) or 0,
               "queued": q.get("queued", 0) + q.get("processing", 0),
               "failed": q.get("failed", 0)}
        failed = [{"intake": r.id, "attempts": r.attempts, "error": r.last_error}
                  for r in s.scalars(select(Intake).where(Intake.state == "failed").order_by(Intake.id).limit(50))]
    if args.json:
        print(json.dumps({**out, "failed_items": failed}))
    else:
        print(" ".join(f"{k}={v}" for k, v in out.items()))
        for f in failed:
            print(f"  failed intake {f['intake']} after {f['attempts']} attempts: {f['error']}")
    return 0


def cmd_requeue(args: argparse.Namespace, settings: Settings) -> int:
    """Put failed intake rows back in the queue."""
    from triagebot.db import queue
    from triagebot.db.engine import open_db
    _engine, sessions = open_db(settings.database_url)
    n = queue.requeue(sessions, args.ids or None)
    print(f"requeued {n}")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Process the intake queue."""
    from triagebot.worker import Worker, run_workers
    if args.until_empty:
        Worker(settings).run(until_empty=True)
        return 0
    return run_workers(settings, args.concurrency)


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Create or upgrade the database schema."""
    from triagebot.db.engine import open_db
    open_db(settings.database_url)
    print("schema up to date")
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """Start the SMTP listener, the web process and a worker together."""
    from triagebot.run import run
    return run(settings, demo=args.demo)


def cmd_smtp(args: argparse.Namespace, settings: Settings) -> int:
    """Run the SMTP listener."""
    from dataclasses import replace
    from triagebot.intake.smtp import serve
    settings = replace(settings, smtp_host=args.host or settings.smtp_host, smtp_port=args.port or settings.smtp_port)
    serve(settings)
    return 0


def cmd_imap(args: argparse.Namespace, settings: Settings) -> int:
    """Run the IMAP poller (or one pass with --once)."""
    from triagebot.intake import imap
    if args.once:
        try:
            print(f"stored {imap.poll_once(settings, processed_folder=args.move_to)}", flush=True)
        except ValueError as e:
            print(f"triagebot imap: {e}", file=sys.stderr)
            return 2
        return 0
    imap.serve(settings, processed_folder=args.move_to)
    return 0


def cmd_sender(args: argparse.Namespace, settings: Settings) -> int:
    """Send queued outgoing mail through the relay (or one pass with --once)."""
    from triagebot.outbound import relay
    if args.once:
        if not settings.relay_host:
            print("triagebot sender: no relay configured (TRIAGEBOT_RELAY_HOST)", file=sys.stderr)
            return 2
        r = relay.send_once(settings)
        print(f"sent {len(r.sent)} retry {len(r.retry)} failed {len(r.failed)}", flush=True)
        return 0
    relay.serve(settings)
    return 0


def cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    """Run the web process (/healthz, /metrics, Slack events and interactivity)."""
    from dataclasses import replace
    from triagebot.web import serve
    serve(replace(settings, web_host=args.host or settings.web_host, web_port=args.port or settings.web_port))
    return 0


def cmd_slack(args: argparse.Namespace, settings: Settings) -> int:
    """Run the Slack app over Socket Mode (no public URL; needs SLACK_APP_TOKEN and SLACK_BOT_TOKEN)."""
    from triagebot.agents.slack_app import socket_mode
    socket_mode(settings)
    return 0


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    """Remove raw messages and personal data older than the age; keep the anonymised statistics."""
    from datetime import timedelta
    from triagebot import privacy
    from triagebot.db.engine import open_db
    try:
        age = privacy.parse_age(args.older_than) if args.older_than else timedelta(days=settings.retention_days)
    except ValueError as e:
        print(f"triagebot purge: {e}", file=sys.stderr)
        return 2
    _engine, sessions = open_db(settings.database_url)
    report = privacy.purge(sessions, age, privacy.admin_actor(args.actor))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"purged before {report['cutoff']}: " + " ".join(f"{k}={v}" for k, v in report.items() if k != "cutoff"))
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    """Write everything stored about a customer (name, domain or address) as JSON: a data-subject request."""
    import os
    from triagebot import privacy
    from triagebot.db.engine import open_db
    _engine, sessions = open_db(settings.database_url)
    data = privacy.export(sessions, args.customer, privacy.admin_actor(args.actor), rules_dir=settings.rules_dir)
    text = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
    if args.out:
        # personal data: readable by the owner only
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    if not (data["cases"] or data["messages"]):
        print(f"triagebot export: nothing stored for {args.customer!r}", file=sys.stderr)
    return 0


def cmd_forget(args: argparse.Namespace, settings: Settings) -> int:
    """Remove or anonymise everything personal about one contact (address or Slack user id); statistics stay."""
    from triagebot import privacy
    from triagebot.db.engine import open_db
    _engine, sessions = open_db(settings.database_url)
    report = privacy.forget(sessions, args.contact, privacy.admin_actor(args.actor))
    if args.json:
        print(json.dumps(report))
    else:
        print("forgotten: " + " ".join(f"{k}={v}" for k, v in report.items()))
    if report.get("intake_still_queued"):
        print(f"triagebot forget: {report['intake_still_queued']} queued message(s) name the contact; "
              "run forget again after the worker has processed them", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    """Measure the performance figures of issue 3 and print them beside their bars."""
    from triagebot.bench.runner import cmd
    return cmd(args, settings)


# Admin commands that read or change stored data and are audited by main(); purge, export and forget
# record their own audit rows, with their results.
AUDITED_COMMANDS = ("status", "requeue", "train", "models")


def _audit_command(args: argparse.Namespace, settings: Settings) -> None:
    from triagebot import privacy
    from triagebot.db.engine import open_db
    _engine, sessions = open_db(settings.database_url)
    options = {k: v for k, v in vars(args).items()
               if k not in ("func", "command", "config", "verbose", "actor") and isinstance(v, (str, int, bool, list))}
    privacy.audit(sessions, privacy.admin_actor(args.actor), args.command, None, {"args": options})


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    """Retrain the classifiers from training/ plus the agents' corrections in the database."""
    from triagebot.agents.feedback import feedback_rows
    from triagebot.db.engine import open_db
    from triagebot.train import cli_train
    _engine, sessions = open_db(settings.database_url)
    return cli_train(models_dir=settings.models_dir, feedback_rows=feedback_rows(sessions), force=args.force,
                     select=not args.no_select)


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """Write the evaluation report (HTML with confusion matrices, plus JSON)."""
    from triagebot.train import cli_evaluate
    return cli_evaluate(args.out, models_dir=settings.models_dir, version=args.version, cv=not args.no_cv,
                        eval_set=args.eval_set, use_eval_set=not args.no_eval_set, settings=settings)


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    """List model versions, promote one, or roll back."""
    from triagebot.train import cli_models
    return cli_models(args.action, args.version, models_dir=settings.models_dir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="triagebot", description=__doc__)
    p.add_argument("--config", help="a TOML settings file (default: TRIAGEBOT_CONFIG)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--actor", help="who runs this, for the audit trail (default: $USER)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("triage", help="classify messages without storing them")
    s.add_argument("paths", nargs="+")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_triage)

    s = sub.add_parser("ingest", help="run the whole pipeline and store the result")
    s.add_argument("paths", nargs="+")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("status", help="counts of messages, cases, queued and failed")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("requeue", help="put failed intake rows back in the queue")
    s.add_argument("ids", nargs="*", type=int)
    s.set_defaults(func=cmd_requeue)

    s = sub.add_parser("worker", help="process the intake queue")
    s.add_argument("--concurrency", type=int, default=1)
    s.add_argument("--until-empty", action="store_true", help="stop when the queue is empty")
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("run", help="start SMTP listener, web process and worker with the configured settings")
    s.add_argument("--demo", action="store_true", help="feed the bundled samples through it and show the cases")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("smtp", help="run the SMTP listener")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=cmd_smtp)

    s = sub.add_parser("imap", help="run the IMAP poller")
    s.add_argument("--once", action="store_true", help="one pass over the mailboxes, then exit")
    s.add_argument("--move-to", metavar="FOLDER", help="move stored mail to this folder instead of marking it read")
    s.set_defaults(func=cmd_imap)

    s = sub.add_parser("sender", help="send queued outgoing mail through the relay")
    s.add_argument("--once", action="store_true", help="one pass over the due mail, then exit")
    s.set_defaults(func=cmd_sender)

    s = sub.add_parser("web", help="run the web process")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=cmd_web)

    s = sub.add_parser("slack", help="run the Slack app over Socket Mode (instead of HTTP on the web process)")
    s.set_defaults(func=cmd_slack)

    s = sub.add_parser("train", help="retrain the classifiers (training/ plus agents' corrections)")
    s.add_argument("--force", action="store_true", help="promote even if it scores worse on the held-out split")
    s.add_argument("--no-select", action="store_true", help="skip model selection by cross-validation")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="write the evaluation report")
    s.add_argument("out", nargs="?", default="reports")
    s.add_argument("--version")
    s.add_argument("--no-cv", action="store_true", help="skip the grouped cross-validation on the training split")
    s.add_argument("--eval-set", metavar="PATH",
                   help="labelled messages to run through the whole pipeline (default: "
                        "every *.jsonl in training/eval/; a file or a directory)")
    s.add_argument("--no-eval-set", action="store_true", help="leave the evaluation-set section out")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("models", help="list model versions, promote one, roll back, remove an unpromoted one")
    s.add_argument("action", nargs="?", default="list", choices=("list", "promote", "rollback", "remove"))
    s.add_argument("version", nargs="?")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("bench", help="performance figures (language ID, classification, load, memory, throughput) "
                                     "beside their bars")
    from triagebot.bench.runner import add_arguments as add_bench_arguments
    add_bench_arguments(s)
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("migrate", help="create or upgrade the database schema")
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("purge", help="remove raw messages and personal data past the retention age")
    s.add_argument("--older-than", metavar="AGE", help="e.g. 90d, 12w, 36h (default: TRIAGEBOT_RETENTION_DAYS days)")
    s.add_argument("--actor", default=argparse.SUPPRESS, help="who runs this, for the audit trail (default: $USER)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_purge)

    s = sub.add_parser("export", help="everything stored about a customer, as JSON (data-subject request)")
    s.add_argument("--customer", required=True, metavar="NAME|DOMAIN|ADDRESS")
    s.add_argument("--out", metavar="FILE", help="write to this file (mode 600) instead of stdout")
    s.add_argument("--actor", default=argparse.SUPPRESS, help="who runs this, for the audit trail (default: $USER)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("forget", help="remove everything personal about a contact; statistics stay")
    s.add_argument("--contact", required=True, metavar="ADDRESS|SLACK_USER_ID")
    s.add_argument("--actor", default=argparse.SUPPRESS, help="who runs this, for the audit trail (default: $USER)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_forget)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from triagebot import crypto, logs
    logs.install()  # no e-mail address, phone number or SIM identifier reaches a log unredacted
    settings = Settings.load(toml_path=args.config)
    try:
        crypto.configure(settings.encryption_key)
    except crypto.CryptoError as e:
        print(f"triagebot: {e}", file=sys.stderr)
        return 2
    if args.command in AUDITED_COMMANDS:
        _audit_command(args, settings)
    return args.func(args, settings)


if __name__ == "__main__":
    sys.exit(main())
