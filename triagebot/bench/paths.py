"""Where the benchmarks find the project's files and the shared corpora."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]        # the checkout: triagebot/bench/paths.py -> ../..
SHARED_ENV = "TRIAGEBOT_SHARED_DIR"


def shared_dir(shared: Path | str | None = None) -> Path:
    """The shared folder with the corpora: the argument, else $TRIAGEBOT_SHARED_DIR, else ../shared."""
    if shared:
        return Path(shared)
    if os.environ.get(SHARED_ENV):
        return Path(os.environ[SHARED_ENV])
    return ROOT.parent / "shared"


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux /proc), NaN elsewhere."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (VmHWM; ru_maxrss where /proc is missing)."""
    v = _status_mb("VmHWM")
    if v == v:
        return v
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        return float("nan")


def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def one_thread_env() -> None:
    """One BLAS/OpenMP thread, as a worker on one core; only effective before numpy is imported."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def pin(cpu: int | None = None) -> int | None:
    """Pin this process to one CPU (the given one, else the idlest allowed one); the CPU, or None if unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if cpu is None:
        cpu = idlest_cpu(allowed)
    if cpu not in allowed:
        raise ValueError(f"CPU {cpu} is not one this process may run on ({allowed})")
    os.sched_setaffinity(0, {cpu})
    return cpu


def idlest_cpu(allowed: list[int], sample_s: float = 0.3) -> int:
    """The allowed CPU with the most idle time over a short sample of /proc/stat (the shared machine's noise)."""
    import time

    def snapshot() -> dict[int, tuple[int, int]]:
        out = {}
        try:
            with open("/proc/stat") as fh:
                for line in fh:
                    parts = line.split()
                    if parts and parts[0].startswith("cpu") and parts[0] != "cpu":
                        vals = [int(x) for x in parts[1:]]
                        out[int(parts[0][3:])] = (vals[3] + (vals[4] if len(vals) > 4 else 0), sum(vals))
        except (OSError, ValueError):
            pass
        return out

    a = snapshot()
    if not a:
        return allowed[0]
    time.sleep(sample_s)
    b = snapshot()

    def idle_share(c: int) -> float:
        if c not in a or c not in b:
            return -1.0
        d_idle, d_total = b[c][0] - a[c][0], b[c][1] - a[c][1]
        return d_idle / d_total if d_total else 1.0

    return max(allowed, key=idle_share)


class CoreMeter:
    """What else ran on one CPU while we measured: other processes' share and hypervisor steal (/proc/stat)."""

    def __init__(self, cpu: int | None) -> None:
        import time
        self.cpu, self._clock = cpu, time
        self._start = self._snapshot()

    def _snapshot(self) -> tuple[float, float, list[int] | None]:
        vals = None
        if self.cpu is not None:
            try:
                with open("/proc/stat") as fh:
                    for line in fh:
                        if line.startswith(f"cpu{self.cpu} "):
                            vals = [int(x) for x in line.split()[1:]]
                            break
            except (OSError, ValueError):
                vals = None
        return self._clock.perf_counter(), self._clock.process_time(), vals

    def stop(self) -> dict | None:
        """Shares of the CPU's time since the start: this process, other processes, steal, idle (None if unknown)."""
        w1, c1, v1 = self._snapshot()
        w0, c0, v0 = self._start
        if v0 is None or v1 is None:
            return None
        d = [b - a for a, b in zip(v0, v1)]
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        total = sum(d[:8]) or 1          # user nice system idle iowait irq softirq steal (guest is in user)
        busy = d[0] + d[1] + d[2] + d[5] + d[6]
        ours = min(busy, (c1 - c0) * hz)
        return {"this_process": round(ours / total, 3), "other_processes": round(max(0, busy - ours) / total, 3),
                "steal": round(d[7] / total, 3) if len(d) > 7 else 0.0,
                "idle": round((d[3] + d[4]) / total, 3), "seconds": round(w1 - w0, 2)}
