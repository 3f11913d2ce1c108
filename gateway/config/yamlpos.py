"""YAML loading that remembers where every key and value was written.

PyYAML's ``construct`` step forgets positions, so we compose the node graph (which carries
``start_mark``) and walk it ourselves, building plain Python objects and two tables keyed by the
key path tuple (``("routes", 0, "upstream")``): the line of each mapping key and the line of each
value. Duplicate keys, which PyYAML silently lets the last one win, are reported here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from gateway.config.errors import ConfigError

Path = tuple[str | int, ...]

_MERGE_TAG = "tag:yaml.org,2002:merge"
# The C composer is several times faster; both produce the same node graph and marks.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class Positions:
    """1-based lines of keys and values, by key path."""

    key_lines: dict[Path, int] = field(default_factory=dict)
    value_lines: dict[Path, int] = field(default_factory=dict)
    # Values YAML itself could not read (already reported): validation stays quiet about them.
    broken: set[Path] = field(default_factory=set)

    def line_of(self, path: Path, *, key: bool = False) -> int | None:
        """Line of the value at ``path`` (or of its key); falls back to the nearest parent."""
        if key and path in self.key_lines:
            return self.key_lines[path]
        probe = path
        while True:
            if probe in self.value_lines:
                return self.value_lines[probe]
            if probe in self.key_lines:
                return self.key_lines[probe]
            if not probe:
                return None
            probe = probe[:-1]


def format_path(path: Path) -> str:
    """``("routes", 0, "match", "x.y")`` -> ``routes[0].match["x.y"]``."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif part and all(c.isalnum() or c in "_-" for c in part):
            out.append(f".{part}" if out else part)
        else:
            out.append(f"[{json.dumps(part)}]")
    return "".join(out)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _Walker:
    def __init__(self, loader: yaml.SafeLoader, source: str) -> None:
        self.loader = loader
        self.source = source
        self.positions = Positions()
        self.errors: list[ConfigError] = []
        self._active: set[int] = set()  # nodes on the current walk path: recursive aliases

    def error(self, line: int | None, path: Path, message: str) -> None:
        self.errors.append(ConfigError(self.source, line, format_path(path), message))

    def walk(self, node: yaml.Node, path: Path) -> Any:
        self.positions.value_lines[path] = _line(node)
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.loader.construct_object(node, deep=True)
            except yaml.YAMLError as exc:
                self.error(_line(node), path, f"cannot read value: {_problem(exc)}")
                self.positions.broken.add(path)
                return None
        if id(node) in self._active:
            self.error(_line(node), path, "recursive alias: a node cannot contain itself")
            self.positions.broken.add(path)
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.walk(child, (*path, i)) for i, child in enumerate(node.value)]
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            self.error(_line(node), path, f"unsupported YAML node {node.tag}")
            return None
        finally:
            self._active.discard(id(node))

    def _key(self, node: yaml.Node, path: Path) -> str | None:
        if not isinstance(node, yaml.ScalarNode):
            self.error(_line(node), path, "mapping keys must be plain strings")
            return None
        try:
            key = self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.error(_line(node), path, f"cannot read key: {_problem(exc)}")
            return None
        if isinstance(key, str):
            return key
        # YAML 1.1 turns plain `on:`, `yes:`, `200:` into bool/int keys; config keys are names,
        # so keep the text as written.
        return str(node.value)

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        merges = [value for key, value in node.value if key.tag == _MERGE_TAG]
        # `<<: *base` merges are walked first so that explicit keys (walked after) win, both in
        # the result and in the position tables; earlier merge sources win over later ones.
        result: dict[str, Any] = {}
        for merge in merges:
            sources = merge.value if isinstance(merge, yaml.SequenceNode) else [merge]
            merged: dict[str, Any] = {}
            for source in reversed(sources):
                if not isinstance(source, yaml.MappingNode):
                    self.error(_line(source), path, "'<<' merge needs a mapping or a list of them")
                    continue
                if id(source) in self._active:
                    self.error(_line(source), path, "recursive alias in '<<' merge")
                    continue
                self._active.add(id(source))
                try:
                    merged.update(self._mapping(source, path))
                finally:
                    self._active.discard(id(source))
            for merged_key, value in merged.items():
                result.setdefault(merged_key, value)
        explicit: set[str] = set()
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self._key(key_node, path)
            if key is None:
                continue
            child = (*path, key)
            if key in explicit:
                first = self.positions.key_lines.get(child)
                self.error(
                    _line(key_node), child, f"duplicate key {key!r} (first defined at line {first})"
                )
                continue
            explicit.add(key)
            self.positions.key_lines[child] = _line(key_node)
            result[key] = self.walk(value_node, child)
        return result


def _problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        parts = [p for p in (exc.problem, exc.context) if p]
        if len(parts) == 2:
            return f"{parts[0]} ({parts[1]})"
        return parts[0] if parts else str(exc)
    return str(exc)


def load_yaml(text: str, source: str) -> tuple[Any, Positions, list[ConfigError]]:
    """Parse one YAML document; returns (data, positions, errors). Empty document -> None."""
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else None
            if isinstance(exc, yaml.composer.ComposerError) and "single document" in str(
                exc.context
            ):
                msg = "a config file holds one YAML document, found a second one ('---')"
            else:
                msg = f"invalid YAML: {_problem(exc)}"
            return None, Positions(), [ConfigError(source, line, "", msg)]
        except yaml.YAMLError as exc:
            return None, Positions(), [ConfigError(source, None, "", f"invalid YAML: {exc}")]
        if node is None:
            return None, Positions(), []
        walker = _Walker(loader, source)
        data = walker.walk(node, ())
        return data, walker.positions, walker.errors
    finally:
        loader.dispose()
