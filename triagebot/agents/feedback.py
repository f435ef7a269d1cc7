"""Agents' corrections as training data: feedback rows to examples in the schema of training/SCHEMA.md."""
from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triagebot.db.tables import Feedback, MessageRow
from triagebot.model import CATEGORIES, LANGUAGES, SERVICES, SEVERITIES, TIERS

log = logging.getLogger(__name__)

LABEL_VALUES = {"category": CATEGORIES, "service": SERVICES, "severity": SEVERITIES}


def _corrections(sessions: sessionmaker[Session]) -> tuple[dict[int, dict[str, Feedback]], dict[int, MessageRow]]:
    """message id -> label -> its newest feedback row; and the messages themselves."""
    newest: dict[int, dict[str, Feedback]] = {}
    with sessions() as s:
        rows = s.scalars(select(Feedback).where(Feedback.field.in_(tuple(LABEL_VALUES)),
                                                Feedback.message_id.is_not(None))
                         .order_by(Feedback.created_at, Feedback.id)).all()
        for fb in rows:
            if fb.new_value not in LABEL_VALUES[fb.field]:
                log.warning("feedback %s ignored: %s=%r is not a label of TAXONOMY.md", fb.id, fb.field, fb.new_value)
                continue
            newest.setdefault(fb.message_id, {})[fb.field] = fb   # ordered oldest first: the newest wins
        messages = {m.id: m for m in s.scalars(select(MessageRow).where(MessageRow.id.in_(list(newest))))}
        s.expunge_all()
    return newest, messages


def feedback_examples(sessions: sessionmaker[Session], partial: bool = False) -> list[dict[str, Any]]:
    """One training example per corrected message (training/SCHEMA.md), in message order.

    Per message and label the newest correction wins; labels no agent touched are the message's stored
    ones; tier and estimate are the stored blast radius. `body` is the message's normalized new text
    (what the agent saw), so `normalized` is true. A message whose labels are incomplete (no model was
    promoted when it came in, and agents set only some labels) is skipped, unless `partial`: then its
    example carries only the labels known (train.dataset's LabelledExample allows that; SCHEMA.md does not).
    """
    newest, messages = _corrections(sessions)
    out = []
    for mid in sorted(newest):
        fields = newest[mid]
        msg = messages.get(mid)
        latest = max(fields.values(), key=lambda f: (f.created_at, f.id))
        labels = {name: (fields[name].new_value if name in fields else getattr(msg, name, None))
                  for name in LABEL_VALUES}
        unknown = [name for name in LABEL_VALUES if labels[name] not in LABEL_VALUES[name]]
        if unknown and not partial:
            log.info("feedback for message %s skipped: no %s known", mid, ", ".join(unknown))
            continue
        labels = {k: v for k, v in labels.items() if k not in unknown}
        tier = msg.blast_tier if msg is not None and msg.blast_tier in TIERS else None
        estimate = msg.blast_estimate if msg is not None else None
        language = latest.language or (msg.language if msg is not None else None)
        channel = latest.channel if latest.channel in ("email", "slack") else (msg.source if msg else "email")
        example: dict[str, Any] = {
            "id": f"feedback-{mid}",
            # one case is one scenario: its messages never sit on both sides of the held-out split
            "scenario": f"feedback-case-{latest.case_id}" if latest.case_id is not None else f"feedback-{mid}",
            "writer": "customer",
            "channel": channel,
            "language": language if language in LANGUAGES else "other",
            "subject": None if channel == "slack" else latest.subject,
            "body": latest.text or ((msg.edited_text or msg.text) if msg is not None else ""),
            "html": False,
            "labels": {**labels, **({"tier": tier} if tier else {}), "estimate": estimate},
            "normalized": True,
            "agent_labels": sorted(fields),   # labels an agent set or confirmed
            "feedback_ids": sorted(f.id for f in fields.values()),
        }
        if not example["body"].strip():
            continue
        out.append(example)
    return out


def feedback_rows(sessions: sessionmaker[Session]) -> list[dict[str, Any]]:
    """Feedback rows as mappings with the message's stored labels, for train.dataset.examples_from_feedback."""
    newest, messages = _corrections(sessions)
    rows = []
    for mid, fields in newest.items():
        msg = messages.get(mid)
        base = {name: getattr(msg, name, None) for name in LABEL_VALUES} if msg is not None else {}
        for fb in fields.values():
            rows.append({"id": fb.id, "message_id": mid, "case_id": fb.case_id, "field": fb.field,
                         "new_value": fb.new_value, "channel": fb.channel, "language": fb.language,
                         "subject": fb.subject, "text": fb.text, "created_at": fb.created_at,
                         "labels": {k: v for k, v in base.items() if v is not None}})
    return rows
