"""`triagebot triage` shows the blast radius and why the severity is what it is, as JSON and as text."""
from __future__ import annotations

import json
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

import pytest

SUPPORT = "support@support.example.net"


def _mail(path: Path, sender: str, subject: str, body: str) -> Path:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = sender, SUPPORT, subject
    m["Message-ID"] = f"<{path.stem}@{sender.split('@')[1]}>"
    m["Date"] = "Mon, 23 Nov 2026 10:00:00 +0100"
    m.set_content(body)
    path.write_bytes(bytes(m))
    return path


def _triage(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "triagebot.cli", "triage", *args], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    return r


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("triage")
    return {
        "mass": _mail(d / "a-mass.eml", "ops@meterco.example", "Meters offline",
                      "Hi,\n\nall 3,000 of our meters are offline since 09:00 and nothing reports in. Please help!"),
        "fleet": _mail(d / "b-fleet.eml", "larmcentralen@tryggahem.example", "Alla larm nere",
                       "Hej, inga av våra trygghetslarm fungerar sedan kl 07, ingen data alls. Ring oss!"),
        "question": _mail(d / "c-question.eml", "ekonomi@meterco.example", "Faktura",
                          "Hello, what is the 'roaming zone 1' charge on the October invoice?"),
    }


def test_json_shows_the_blast_radius_and_the_severity_reasons(inputs):
    r = _triage(str(inputs["mass"]), str(inputs["fleet"]), str(inputs["question"]), "--json")
    mass, fleet, question = (json.loads(line) for line in r.stdout.splitlines())

    assert mass["blast_radius"]["estimate"] == 3000 and mass["blast_radius"]["tier"] == "mass"
    assert mass["severity"] == "critical"
    blast = [t for t in mass["trail"] if t.startswith("blast_radius:")]
    assert blast and "3000" in blast[0] and "3,000 of our meters" in blast[0]
    severity = [t for t in mass["trail"] if t.startswith("severity:")]
    assert severity and "mass_or_fleet_outage" in severity[-1] and "critical" in severity[-1]

    # "none of our alarms" at a customer whose fleet size is known: the fleet is the estimate
    assert fleet["blast_radius"]["tier"] == "mass" and fleet["blast_radius"]["estimate"] == 8500
    assert any("fleet 8500" in t for t in fleet["trail"] if t.startswith(("customer:", "blast_radius:")))
    assert fleet["severity"] == "critical"
    assert any("mass_or_fleet_outage" in t for t in fleet["trail"] if t.startswith("severity:"))

    assert question["blast_radius"]["tier"] == "none" and question["blast_radius"]["estimate"] is None
    assert question["severity"] == "low"
    assert any(t.startswith("severity:") for t in question["trail"])


def test_text_output_shows_the_blast_radius_and_the_trail(inputs):
    r = _triage(str(inputs["mass"]))
    head, *trail = r.stdout.splitlines()
    assert "severity=critical" in head and "blast=mass/3000" in head
    assert any(line.strip().startswith("blast_radius: mass (estimate 3000)") for line in trail)
    assert any(line.strip().startswith("severity:") and "mass_or_fleet_outage" in line for line in trail)
