"""`triagebot bench`: the performance figures of issue 3 beside their bars.

Kept light on purpose: `python -m triagebot.bench.probe` imports this package first, and the probe measures
import time and memory from a clean start. The parts: langid.py (language ID vs langdetect), classify.py
(classification cost and load), probe.py (fresh-process load time and memory), triage.py (end-to-end
throughput on one core), runner.py (the command, the table, the bars).
"""
