"""A strict YAML reader that remembers lines: the generic half of the config, with no schema in it.

Theory of operation: the YAML is *composed* with PyYAML's safe loader, not constructed, so every
value is still a node that knows its line. A ``Reader`` turns nodes into Python values on request
(a mapping with required and optional keys, a list, text, a number, a duration, an endpoint...).
When a node breaks a rule the reader records one problem, ``FILE:LINE: key.path: what is wrong``,
returns None and lets the caller carry on, so an operator sees every problem in one run.

The loader is libyaml's (``CSafeLoader``) when PyYAML has it: about ten times faster than the
pure-Python one (a 10,000-entry allowlist composes in ~20 ms instead of ~240 ms), which matters
because a reload parses in a worker thread that shares the GIL with the event loop. Composing
recurses once per level of nesting, on the C stack with libyaml, so the document's events (parsed
with an explicit stack, whatever the depth) are scanned first and collections nested more than
``MAX_NESTING`` deep are refused before anything recurses into them.

Strictness: unknown keys (with a "did you mean"), duplicated keys, YAML merge keys and wrong types
are problems. An optional key set to null (``admin:`` with nothing after it) counts as absent.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from mtls.durations import parse_duration
from mtls.endpoints import Endpoint, parse_endpoint
from mtls.spiffe import InvalidSpiffeId, PatternSet, parse_pattern

_TAG = "tag:yaml.org,2002:"
STR, INT, FLOAT, BOOL, NULL, TIMESTAMP = (_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp"))
MERGE = _TAG + "merge"
_TEXT_TAGS = (STR, INT, FLOAT)  # what ``Reader.text`` accepts: unquoted numbers are text too
_SCALARS = SafeConstructor()
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # PyYAML built without libyaml has no CSafeLoader
MAX_NESTING = 64  # collections inside collections; a config needs five or six
_OPENS = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSES = (yaml.MappingEndEvent, yaml.SequenceEndEvent)

T = TypeVar("T")


class DocumentError(Exception):
    """The file cannot be read as one YAML document; the message is the one problem line."""


def read_document(source: Path) -> str:
    """The file's text; DocumentError if it cannot be read or is not UTF-8."""
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise DocumentError(f"{source}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DocumentError(f"{source}:{line}: the config file is not UTF-8 text ({exc.reason})") from None


def compose(text: str, label: str) -> Node | None:
    """The document's root node, or None when it holds nothing (or only null); DocumentError on bad YAML."""
    try:
        _refuse_deep_nesting(text, label)
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        raise DocumentError(_syntax_problem(label, text, exc)) from None
    except UnicodeEncodeError as exc:  # libyaml reads UTF-8: a lone surrogate (never from a file) cannot pass
        line = text[: exc.start].count("\n") + 1
        raise DocumentError(f"{label}:{line}: YAML syntax error: an unpaired surrogate is not valid text") from None
    if root is None or (isinstance(root, ScalarNode) and root.tag == NULL):
        return None
    return root


def _refuse_deep_nesting(text: str, label: str) -> None:
    """DocumentError if collections nest more than MAX_NESTING deep; YAMLError on bad syntax."""
    depth = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, _OPENS):
            depth += 1
            if depth > MAX_NESTING:
                raise DocumentError(
                    f"{label}:{event.start_mark.line + 1}: YAML syntax error: collections nested more than "
                    f"{MAX_NESTING} levels deep; a config needs a handful"
                )
        elif isinstance(event, _CLOSES):
            depth -= 1


def _syntax_problem(label: str, text: str, exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        what = ", ".join(part for part in (exc.context, exc.problem) if part) or "unreadable"
    else:  # yaml.reader.ReaderError: a character YAML does not allow
        line = text[: getattr(exc, "position", 0)].count("\n") + 1
        what = str(exc).splitlines()[0]
    return f"{label}:{line}: YAML syntax error: {what}"


# --- looking at nodes without reading them ----------------------------------------------------


def line_of(node: Node) -> int:
    return node.start_mark.line + 1


def describe(node: Node) -> str:
    """What the node is, for "expected X, got Y" messages: ``a list``, ``the string 'x'``..."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == NULL:
        return "nothing (null)"
    if node.tag == STR:
        return f"the string {node.value!r}"
    kind = {INT: "the number", FLOAT: "the number", BOOL: "the boolean", TIMESTAMP: "the date"}.get(node.tag)
    return f"{kind} {node.value}" if kind else f"a value tagged {node.tag!r}"


def value_of(mapping: MappingNode, key: str) -> Node | None:
    """The value node of ``key`` in a mapping node, unchecked (the first one if the key is duplicated)."""
    for key_node, value_node in mapping.value:
        if isinstance(key_node, ScalarNode) and key_node.value == key:
            return value_node
    return None


def written_scalar(node: Node | None) -> str | None:
    """A non-null scalar as written, whatever its type; None for anything else."""
    if isinstance(node, ScalarNode) and node.tag != NULL:
        return node.value
    return None


def written_text(node: Node | None) -> str | None:
    """What ``Reader.text`` accepts, as written, without recording anything; None for anything else."""
    if isinstance(node, ScalarNode) and node.tag in _TEXT_TAGS:
        return node.value
    return None


def join(path: str, key: str) -> str:
    """The key path of ``key`` inside the mapping at ``path`` (the top level's path is "")."""
    return f"{path}.{key}" if path else key


def _did_you_mean(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; expected one of: {', '.join(known)}"


# --- reading nodes into values ----------------------------------------------------------------


class Fields:
    """The value nodes of one mapping's known, non-null keys, in document order."""

    def __init__(self, path: str, nodes: dict[str, Node]):
        self.path = path
        self.nodes = nodes

    def __contains__(self, key: str) -> bool:
        return key in self.nodes

    def __iter__(self) -> Iterator[str]:
        return iter(self.nodes)

    def node(self, key: str) -> Node | None:
        return self.nodes.get(key)

    def read(self, key: str, read: Callable[[Node, str], T | None], default: T | None = None) -> T | None:
        """``read(node, key path)`` for the key's value, or ``default`` when the key is absent."""
        if key not in self.nodes:
            return default
        return read(self.nodes[key], join(self.path, key))


class Reader:
    """Reads nodes into values; each method returns a value, or None after recording a problem.

    ``label`` names the file in problems; relative file paths are resolved against ``base_dir``.
    """

    def __init__(self, label: str, base_dir: Path):
        self.label = label
        self.base_dir = base_dir
        self._problems: list[tuple[int, str]] = []

    def problem(self, node: Node, path: str, message: str) -> None:
        self._problems.append((line_of(node), f"{self.label}:{line_of(node)}: {path}: {message}"))

    def problems(self) -> list[str]:
        """Every problem recorded so far, sorted by line (in reading order within a line)."""
        return [message for _, message in sorted(self._problems, key=lambda p: p[0])]

    def checkpoint(self) -> int:
        """A mark to pass to ``failed_since``."""
        return len(self._problems)

    def failed_since(self, checkpoint: int) -> bool:
        """Whether a problem was recorded after ``checkpoint()`` returned ``checkpoint``."""
        return len(self._problems) > checkpoint

    # shapes

    def mapping(
        self, node: Node, path: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()
    ) -> Fields | None:
        """The known keys' value nodes. Null optional values are left out, as if absent."""
        if not isinstance(node, MappingNode):
            self.problem(node, path, f"expected a mapping, got {describe(node)}")
            return None
        known = required + optional
        seen: dict[str, Node] = {}
        fields: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE:
                self.problem(key_node, path, "YAML merge keys ('<<') are not supported; write the keys out")
                continue
            if not (isinstance(key_node, ScalarNode) and key_node.tag == STR):
                self.problem(key_node, path, f"keys must be strings, got {describe(key_node)}")
                continue
            key = key_node.value
            key_path = join(path, key)
            if key in seen:
                self.problem(key_node, key_path, f"duplicate key (first set on line {line_of(seen[key])})")
                continue
            seen[key] = key_node
            if key not in known:
                self.problem(key_node, key_path, "unknown key" + _did_you_mean(key, known))
            elif value_node.tag == NULL and isinstance(value_node, ScalarNode):
                if key in required:
                    self.problem(value_node, key_path, "needs a value")
            else:
                fields[key] = value_node
        for key in required:
            if key not in seen:
                self.problem(node, join(path, key), "required key is missing")
        return Fields(path, fields)

    def sequence(self, node: Node, path: str) -> list[tuple[str, Node]] | None:
        """The items with their key paths (``path[i]``)."""
        if not isinstance(node, SequenceNode):
            self.problem(node, path, f"expected a list, got {describe(node)}")
            return None
        return [(f"{path}[{i}]", item) for i, item in enumerate(node.value)]

    def each(self, node: Node, path: str, read_item: Callable[[Node, str], T | None]) -> tuple[T, ...]:
        """A list read item by item: the items that read cleanly (the others recorded their problems)."""
        items = self.sequence(node, path)
        if items is None:
            return ()
        read = [read_item(item, item_path) for item_path, item in items]
        return tuple(value for value in read if value is not None)

    # scalars

    def text(self, node: Node, path: str) -> str | None:
        """A string as written. Unquoted numbers count (``name: 123``), booleans and null do not."""
        if written_text(node) is None:
            hint = "; quote it if you mean text" if node.tag == BOOL else ""
            self.problem(node, path, f"expected a string, got {describe(node)}{hint}")
            return None
        try:
            node.value.encode("utf-8")
        except UnicodeEncodeError:
            self.problem(node, path, "contains an unpaired surrogate escape; it is not valid text")
            return None
        return node.value

    def choice(self, node: Node, path: str, allowed: tuple[str, ...]) -> str | None:
        value = self.text(node, path)
        if value is not None and value not in allowed:
            self.problem(node, path, f"{value!r} is not one of: {', '.join(allowed)}")
            return None
        return value

    def integer(self, node: Node, path: str) -> int | None:
        if not (isinstance(node, ScalarNode) and node.tag == INT):
            self.problem(node, path, f"expected a whole number, got {describe(node)}")
            return None
        try:
            return _SCALARS.construct_yaml_int(node)
        except (ValueError, IndexError):
            self.problem(node, path, f"{node.value!r} is not a whole number")
            return None

    def number(self, node: Node, path: str) -> float | None:
        if not (isinstance(node, ScalarNode) and node.tag in (INT, FLOAT)):
            self.problem(node, path, f"expected a number, got {describe(node)}")
            return None
        construct = _SCALARS.construct_yaml_int if node.tag == INT else _SCALARS.construct_yaml_float
        try:
            return float(construct(node))
        except (ValueError, IndexError, OverflowError):
            self.problem(node, path, f"{node.value!r} is not a number")
            return None

    def boolean(self, node: Node, path: str) -> bool | None:
        value = None
        if isinstance(node, ScalarNode) and node.tag == BOOL:
            value = SafeConstructor.bool_values.get(node.value.lower())
        if value is None:
            self.problem(node, path, f"expected true or false, got {describe(node)}")
            return None
        return value

    def duration(self, node: Node, path: str) -> float | None:
        """Seconds, from ``90s``, ``15m``, ``24h``... (see mtls.durations)."""
        raw = self.integer(node, path) if node.tag == INT else self.text(node, path)
        if raw is None:
            return None
        try:
            return parse_duration(raw)
        except ValueError as exc:
            self.problem(node, path, str(exc))
            return None

    def endpoint(self, node: Node, path: str, *, unix: bool = False, hostname: bool = False) -> Endpoint | None:
        """``host:port``, ``[v6]:port`` or ``unix:/path``; the options are mtls.endpoints.parse_endpoint's."""
        raw = self.text(node, path)
        if raw is None:
            return None
        try:
            return parse_endpoint(raw, unix=unix, hostname=hostname)
        except ValueError as exc:
            self.problem(node, path, str(exc))
            return None

    def file_path(self, node: Node, path: str) -> Path | None:
        """A file path, resolved against the config file's directory when relative."""
        raw = self.text(node, path)
        if raw is None:
            return None
        if not raw or any(ord(ch) < 0x20 for ch in raw):
            self.problem(node, path, f"{raw!r} is not a file path (did you paste the file's contents?)"
                         if "\n" in raw else f"{raw!r} is not a file path")
            return None
        return self.base_dir / raw

    def patterns(self, node: Node, path: str) -> PatternSet | None:
        """A non-empty list of SPIFFE IDs or patterns (``spiffe://td/ns/*``), indexed once for matching;
        None unless every entry is valid."""
        items = self.sequence(node, path)
        if items is None:
            return None
        if not items:
            self.problem(node, path, "must list at least one SPIFFE ID or pattern; an empty list allows nothing")
            return None
        parsed = []
        for item_path, item in items:
            raw = self.text(item, item_path)
            if raw is None:
                continue
            try:
                parsed.append(parse_pattern(raw))
            except InvalidSpiffeId as exc:
                self.problem(item, item_path, f"{raw!r} is not a valid SPIFFE ID: {exc.rule}")
        return PatternSet(parsed) if len(parsed) == len(items) else None
