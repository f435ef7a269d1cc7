"""The model registry in models/: versions with their model cards, the promoted one, promote and rollback,
safe loading (skops with an explicit list of trusted types, exact library versions) and hot reload."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.json"
MODEL_FILE = "model.skops"
CARD_FILE = "model_card.json"
REGISTRY_FORMAT = 1
# The only non-default types a model file may contain. skops refuses anything else; we never pass trusted=True.
TRUSTED_TYPES: frozenset[str] = frozenset({
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.calibration._TemperatureScaling",
    "triagebot.train.features.CompactTfidfVectorizer",
    "triagebot.train.features.SpacyAnalyzer",
    "triagebot.train.models.TriageClassifier",
})
# A model is only loaded by the exact versions that wrote it: skops/sklearn internals change between releases.
STRICT_LIBRARIES = ("scikit-learn", "skops")
RECORDED_LIBRARIES = ("scikit-learn", "skops", "numpy", "scipy", "spacy", "spacy-lookups-data")
DEFAULT_CHECK_SECONDS = 2.0
FILE_MODE = 0o644
DIR_MODE = 0o755


class ModelError(RuntimeError):
    """A model cannot be used: missing, tampered with, or written by other library versions."""


class ModelVersionError(ModelError):
    """The model was written by other versions of scikit-learn/skops than this process has."""


def library_versions() -> dict[str, str]:
    """The versions of the libraries a model depends on, plus Python."""
    out = {"python": platform.python_version()}
    for name in RECORDED_LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    # readers (running workers) must never see a half-written file: write beside, then rename over
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; the registry must be readable by the worker's user too
        os.chmod(tmp, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model with its version and card."""

    version: str
    model: Any
    card: Mapping[str, Any]


@dataclass(frozen=True)
class VersionInfo:
    """One registered version as `triagebot models` lists it."""

    version: str
    created: str
    promoted: bool
    heldout_macro_f1: float | None
    n_train: int | None
    data_hash: str | None
    path: Path


class Registry:
    """models/registry.json and the version folders beside it."""

    def __init__(self, models_dir: Path | str) -> None:
        self.dir = Path(models_dir)
        self.path = self.dir / REGISTRY_FILE

    # -- reading -----------------------------------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        """The registry content; an empty registry when there is no file yet."""
        if not self.path.exists():
            return {"format": REGISTRY_FORMAT, "promoted": None, "versions": {}, "history": []}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ModelError(f"{self.path}:{e.lineno}: not valid JSON: {e.msg}") from None
        if data.get("format") != REGISTRY_FORMAT:
            raise ModelError(f"{self.path}: registry format {data.get('format')!r}, this code reads {REGISTRY_FORMAT}")
        return data

    def promoted(self) -> str | None:
        """The promoted version, or None."""
        return self.read().get("promoted")

    def card(self, version: str) -> dict[str, Any]:
        """The model card of a version."""
        path = self.dir / version / CARD_FILE
        if not path.exists():
            raise ModelError(f"{path}: no model card; version {version!r} is incomplete")
        return json.loads(path.read_text(encoding="utf-8"))

    def versions(self) -> list[VersionInfo]:
        """Every registered version, oldest first."""
        data = self.read()
        out = []
        for v, entry in sorted(data["versions"].items(), key=lambda kv: kv[1].get("created", "")):
            out.append(VersionInfo(v, entry.get("created", ""), v == data.get("promoted"),
                                   entry.get("heldout_macro_f1"), entry.get("n_train"), entry.get("data_hash"),
                                   self.dir / v))
        return out

    # -- writing -----------------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write of registry.json under an exclusive lock (two CLI runs at once stay consistent)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        # the lock is taken on the folder itself, so no lock file lands in models/
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = self.read()
            yield data
            _write_json_atomic(self.path, data)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def save(self, model: Any, card: Mapping[str, Any], version: str | None = None) -> str:
        """Write a model and its card as a new version (not promoted); returns the version."""
        import skops.io as sio

        created = utc_now()
        data_hash = str(card.get("training_data", {}).get("hash", ""))
        if version is None:
            base = f"{created.strftime('%Y%m%dT%H%M%SZ')}-{(data_hash or os.urandom(4).hex())[:8]}"
            version, n = base, 1
            while (self.dir / version).exists():   # two runs on the same data within one second
                n += 1
                version = f"{base}-{n}"
        final = self.dir / version
        if final.exists():
            raise ModelError(f"{final}: version exists already")
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.dir, prefix=f".{version}."))
        os.chmod(tmp, DIR_MODE)
        try:
            sio.dump(model, tmp / MODEL_FILE)
            untrusted = sorted(sio.get_untrusted_types(file=tmp / MODEL_FILE))
            unexpected = sorted(set(untrusted) - TRUSTED_TYPES)
            if unexpected:
                raise ModelError(f"the model holds types outside TRUSTED_TYPES: {', '.join(unexpected)}; "
                                 "add them to triagebot/train/registry.py only after reading their code")
            full = dict(card)
            full.update({
                "version": version,
                "created": created.isoformat(timespec="seconds"),
                "format": "skops",
                "model_file": MODEL_FILE,
                "file_sha256": sha256_file(tmp / MODEL_FILE),
                "file_bytes": (tmp / MODEL_FILE).stat().st_size,
                "libraries": library_versions(),
                "trusted_types": untrusted,
            })
            _write_json_atomic(tmp / CARD_FILE, full)
            os.rename(tmp, final)
        except BaseException:
            for p in tmp.glob("*"):
                p.unlink()
            tmp.rmdir()
            raise
        with self._locked() as data:
            data["versions"][version] = {
                "created": full["created"],
                "heldout_macro_f1": full.get("metrics", {}).get("heldout_macro_f1"),
                "n_train": full.get("training_data", {}).get("n_train"),
                "data_hash": data_hash or None,
            }
        return version

    def promote(self, version: str, reason: str = "", forced: bool = False) -> None:
        """Make a version the one running processes use."""
        with self._locked() as data:
            if version not in data["versions"]:
                raise ModelError(f"no version {version!r} in {self.path}; `triagebot models` lists them")
            previous = data.get("promoted")
            data["promoted"] = version
            data["history"].append({"at": utc_now().isoformat(timespec="seconds"), "action": "promote",
                                    "version": version, "previous": previous, "forced": forced, "reason": reason})

    def rollback(self, reason: str = "") -> str:
        """Promote again the version that was promoted before the current one; returns it."""
        with self._locked() as data:
            current = data.get("promoted")
            # walk back through promotions to the one before the current version took over
            target = None
            for event in reversed(data["history"]):
                if event.get("version") == current and event.get("previous") and event["previous"] != current:
                    target = event["previous"]
                    break
            if target is None or target not in data["versions"]:
                raise ModelError("nothing to roll back to: no earlier promoted version is registered")
            data["promoted"] = target
            data["history"].append({"at": utc_now().isoformat(timespec="seconds"), "action": "rollback",
                                    "version": target, "previous": current, "forced": False, "reason": reason})
        return target

    def remove(self, version: str, reason: str = "") -> None:
        """Delete a version that is not promoted (its folder and its entry); the history keeps a line for it."""
        with self._locked() as data:
            if version not in data["versions"]:
                raise ModelError(f"no version {version!r} in {self.path}; `triagebot models` lists them")
            if version == data.get("promoted"):
                raise ModelError(f"{version} is the promoted version; promote another one first")
            folder = self.dir / version
            if folder.is_dir():
                for p in folder.iterdir():
                    p.unlink()
                folder.rmdir()
            del data["versions"][version]
            data["history"].append({"at": utc_now().isoformat(timespec="seconds"), "action": "remove",
                                    "version": version, "previous": None, "forced": False, "reason": reason})

    # -- loading -----------------------------------------------------------------------------------------
    def load(self, version: str | None = None) -> LoadedModel:
        """Load a version (default: the promoted one), refusing other library versions and unexpected types."""
        import skops.io as sio

        version = version or self.promoted()
        if not version:
            raise ModelError(f"{self.path}: no promoted model; run `triagebot train` first")
        card = self.card(version)
        path = self.dir / version / card.get("model_file", MODEL_FILE)
        check_versions(card, where=str(self.dir / version))
        if not path.exists():
            raise ModelError(f"{path}: model file missing")
        digest = sha256_file(path)
        if digest != card.get("file_sha256"):
            raise ModelError(f"{path}: SHA-256 {digest[:12]}… does not match its model card; refusing to load")
        untrusted = set(sio.get_untrusted_types(file=path))
        unexpected = sorted(untrusted - TRUSTED_TYPES)
        if unexpected:
            raise ModelError(f"{path}: holds types that are not trusted: {', '.join(unexpected)}; refusing to load")
        model = sio.load(path, trusted=sorted(untrusted))
        from triagebot.train.models import TriageClassifier

        if not isinstance(model, TriageClassifier):
            raise ModelError(f"{path}: holds a {type(model).__name__}, not a TriageClassifier")
        return LoadedModel(version, model, card)


def check_versions(card: Mapping[str, Any], where: str = "model") -> None:
    """Raise ModelVersionError when the card's scikit-learn/skops versions differ from the installed ones."""
    have = library_versions()
    wrote = card.get("libraries", {})
    diffs = [f"{lib} {wrote.get(lib, 'unknown')} (installed: {have.get(lib)})"
             for lib in STRICT_LIBRARIES if wrote.get(lib) != have.get(lib)]
    if diffs:
        raise ModelVersionError(
            f"{where}: this model was saved with {', '.join(diffs)}; a model is only loaded by the exact "
            "versions that saved it. Install the versions in its model card, or retrain with `triagebot train`.")
    for lib in RECORDED_LIBRARIES:
        if lib not in STRICT_LIBRARIES and wrote.get(lib) and wrote.get(lib) != have.get(lib):
            log.warning("%s: model saved with %s %s, installed %s", where, lib, wrote.get(lib), have.get(lib))


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_size)


@dataclass
class ModelHandle:
    """The promoted model for a long-running process; picks up a new promotion without a restart.

    `get()` looks at registry.json at most every `check_seconds`; when the promoted version changed it loads
    the new one. A model that fails to load is logged and the one in use is kept.
    """

    models_dir: Path
    check_seconds: float = DEFAULT_CHECK_SECONDS
    _loaded: LoadedModel | None = field(default=None, init=False, repr=False)
    _signature: tuple[int, int, int] | None = field(default=None, init=False, repr=False)
    _checked_at: float = field(default=float("-inf"), init=False, repr=False)
    _error: str | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def error(self) -> str | None:
        """Why the last load failed, if it did."""
        return self._error

    def get(self) -> LoadedModel | None:
        """The model to use now (None if none can be loaded)."""
        now = time.monotonic()
        if now - self._checked_at < self.check_seconds:
            return self._loaded
        with self._lock:
            if now - self._checked_at < self.check_seconds:
                return self._loaded
            self._checked_at = now
            registry = Registry(self.models_dir)
            sig = _signature(registry.path)
            if sig == self._signature and (self._loaded is not None or self._error is not None):
                return self._loaded
            self._signature = sig
            try:
                version = registry.promoted()
                if version and (self._loaded is None or self._loaded.version != version):
                    started = time.perf_counter()
                    fresh = registry.load(version)
                    # ready before it is swapped in: the message after a promotion pays no start-up cost
                    fresh.model.warm_up()
                    self._loaded = fresh
                    log.info("loaded model %s in %.2f s", version, time.perf_counter() - started)
                elif not version:
                    self._loaded = None
                self._error = None
            except Exception as e:  # noqa: BLE001 - a broken promotion must not take the worker down
                self._error = str(e)
                log.error("model reload failed, keeping %s: %s",
                          self._loaded.version if self._loaded else "no model", e)
            return self._loaded
