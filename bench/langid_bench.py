"""Language-identification benchmark: triagebot.langid against plain langdetect, same run, same texts.

Run: .venv/bin/python bench/langid_bench.py [--limit N] [--no-langdetect] [--shared DIR] [--json]

The code lives in triagebot/bench/langid.py (`triagebot bench` runs it too, with the bars beside the figures).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triagebot.bench.langid import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
