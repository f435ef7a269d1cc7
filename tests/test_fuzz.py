"""The atheris targets fuzz/fuzz_email.py and fuzz/fuzz_slack.py, run for a bounded time: no crash, hang or blow-up.

Skipped (with the reason) when atheris is not installed in this interpreter. Longer runs are for people:
`.venv/bin/python fuzz/fuzz_email.py -max_total_time=600` (and fuzz_slack.py the same way).
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "fuzz" / "fuzz_email.py"
# seconds of fuzzing per target in the test suite: the e-mail side is where the depth is
FUZZ_SECONDS = {"fuzz_email.py": 30, "fuzz_slack.py": 15}
SEED = {"fuzz_email.py": "crafted-nested.eml", "fuzz_slack.py": "crafted-edit.json"}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                reason="atheris is not installed (pip install atheris==3.0.0)")


@pytest.mark.parametrize("target", sorted(FUZZ_SECONDS))
def test_the_fuzz_target_runs_clean_for_a_while(tmp_path: Path, target: str) -> None:
    corpus = tmp_path / "corpus"
    seconds = FUZZ_SECONDS[target]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / target), f"-max_total_time={seconds}", "-timeout=20",
         "-rss_limit_mb=1536", "-seed=1", "-print_final_stats=1", str(corpus)],
        cwd=tmp_path, capture_output=True, text=True, timeout=seconds + 90)
    log = proc.stderr[-5000:]
    findings = sorted(p.name for p in tmp_path.glob("*") if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert proc.returncode == 0 and not findings, f"the fuzzer found {findings}:\n{log}"
    runs = re.search(r"Done (\d+) runs", proc.stderr)
    assert runs and int(runs.group(1)) > 100, log
    # the corpus was seeded (with the shared mails, when present, and the crafted seeds)
    assert (corpus / SEED[target]).is_file()


def test_the_target_fails_on_a_broken_check(tmp_path: Path) -> None:
    """The target really checks: a Message that breaks a check raises, it is not swallowed."""
    code = (
        "import runpy\n"
        f"ns = runpy.run_path({str(TARGET)!r}, run_name='fuzz_target')\n"
        "mail = b'From: a@b.se\\r\\n\\r\\nAll SIMs are down.\\r\\n'\n"
        "ns['TestOneInput'](mail)\n"
        "print('clean input passed')\n"
        "ns['_check'].__globals__['MAX_BODY_CHARS'] = 5\n"
        "try:\n"
        "    ns['TestOneInput'](mail)\n"
        "except AssertionError:\n"
        "    print('broken check caught')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split("\n")[-3:-1] == ["clean input passed", "broken check caught"], proc.stderr[-3000:]
