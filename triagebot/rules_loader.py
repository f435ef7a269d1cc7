"""Loading rule files from rules/ with errors that name the file and line of a mistake."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

RULES_DIR = Path(__file__).resolve().parent.parent / "rules"


class RuleError(ValueError):
    """A rule file is wrong: says which file, which line, and what."""

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        self.path, self.line, self.message = str(path), line, message
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Item:
    """One entry of a rule file and the line it starts on (1-based)."""

    line: int
    value: Any


def rules_path(name: str, rules_dir: Path | None = None) -> Path:
    """The path of a rule file by name, in the given or the shipped rules folder."""
    return (rules_dir or RULES_DIR) / name


def load_jsonl(path: Path) -> list[Item]:
    """Every non-blank, non-comment line of a JSONL file as an Item."""
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            items.append(Item(n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise RuleError(path, n, f"not valid JSON: {e.msg}") from None
    return items


def _plain(node: yaml.Node) -> Any:
    return yaml.safe_load(yaml.serialize(node))


def load_yaml(path: Path) -> Any:
    """A YAML file's content, with syntax errors reported by file and line."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise RuleError(path, line, f"YAML error: {e.problem}") from None


def compose(path: Path) -> yaml.Node | None:
    """A rule file's YAML node tree (with line marks); a missing file or a syntax error is a RuleError."""
    if not path.exists():
        raise RuleError(path, None, "rule file is missing")
    try:
        return yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise RuleError(path, line, f"YAML error: {e.problem}") from None


def load_yaml_items(path: Path, key: str | None = None) -> list[Item]:
    """The entries of a YAML list (top level, or under `key`), each with its line number."""
    root = compose(path)
    node = root
    if key is not None:
        if not isinstance(root, yaml.MappingNode):
            raise RuleError(path, 1, f"expected a mapping with key {key!r}")
        found = [v for k, v in root.value if k.value == key]
        if not found:
            raise RuleError(path, 1, f"missing key {key!r}")
        node = found[0]
    if node is None:
        return []
    if not isinstance(node, yaml.SequenceNode):
        raise RuleError(path, node.start_mark.line + 1, "expected a list")
    return [Item(child.start_mark.line + 1, _plain(child)) for child in node.value]


def require(item: Item, path: Path, fields: dict[str, type | tuple[type, ...]]) -> dict:
    """Check that an item is a mapping with the given typed fields; raise RuleError naming the line."""
    if not isinstance(item.value, dict):
        raise RuleError(path, item.line, "expected a mapping")
    for name, typ in fields.items():
        if name not in item.value:
            raise RuleError(path, item.line, f"missing field {name!r}")
        if not isinstance(item.value[name], typ):
            raise RuleError(path, item.line, f"field {name!r} has the wrong type ({type(item.value[name]).__name__})")
    return item.value


def check_choice(item: Item, path: Path, field: str, allowed: tuple[str, ...]) -> None:
    """Raise RuleError when item[field] is not one of the allowed values."""
    v = item.value.get(field) if isinstance(item.value, dict) else None
    if v not in allowed:
        raise RuleError(path, item.line, f"{field}={v!r} is not one of {', '.join(allowed)}")


def iter_rule_files(pattern: str, rules_dir: Path | None = None) -> Iterator[Path]:
    """Rule files matching a glob, in name order."""
    yield from sorted((rules_dir or RULES_DIR).glob(pattern))
