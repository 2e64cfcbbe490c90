"""Reading composed YAML nodes against the settings schema, collecting every problem.

`Reader` interpolates ${VAR} references and types scalars; `Section` reads one mapping
whose allowed keys are the fields of a settings dataclass. Converters (`integer`,
`duration`, ...) turn a `Scalar` into a value or raise `Invalid` with the message shown
after `FILE:LINE: dotted.key:`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from config.durations import DURATION_EXAMPLES, parse_duration
from config.errors import Problem

__all__ = [
    "Invalid",
    "Item",
    "Reader",
    "Scalar",
    "Section",
    "boolean",
    "byte_size",
    "choice",
    "duration",
    "fraction",
    "integer",
    "interpolate",
    "string",
    "string_text",
]

T = TypeVar("T")
_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_NAME_AND_DEFAULT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


class Invalid(ValueError):
    """A value does not fit its key."""


@dataclass(frozen=True)
class Collection:
    """Stands in for a list or mapping found where a single value belongs."""

    kind: str


@dataclass(frozen=True)
class Scalar:
    value: object  # as YAML types it; interpolated text is typed again from scratch
    text: str  # the text after interpolation
    interpolated: bool = False

    def show(self) -> str:
        """The value as the user wrote it, for "got ..." in messages."""
        if isinstance(self.value, Collection):
            return f"a {self.value.kind}"
        if self.value is None:
            return "null"
        return repr(self.text) if isinstance(self.value, str) else self.text


@dataclass(frozen=True)
class Item(Generic[T]):
    """One converted list element with where it came from."""

    value: T
    line: int
    key: str


Convert = Callable[[Scalar], T]
Pair = tuple[Node, Node]


def interpolate(text: str, env: Mapping[str, str]) -> tuple[str, bool, list[str]]:
    """Expand ${VAR} and ${VAR:-default} (`$${` is a literal `${`).

    Returns the new text, whether any reference was expanded, and the problems found.
    """
    problems: list[str] = []
    expanded = False

    def replace(match: re.Match[str]) -> str:
        nonlocal expanded
        if match.group(0) == "$${":
            return "${"
        if match.group(1) is None:
            problems.append("unterminated ${ (write $${ for a literal ${)")
            return ""
        reference = _NAME_AND_DEFAULT.fullmatch(match.group(1))
        if reference is None:
            expected = "expected ${NAME} or ${NAME:-default}"
            problems.append(f"malformed reference {match.group(0)} ({expected})")
            return ""
        expanded = True
        name, default = reference.groups()
        value = env.get(name)
        if default is not None and not value:
            return default
        if value is None:
            problems.append(f"environment variable {name} is not set (set it, or write ${{{name}:-default}})")
            return ""
        return value

    return _REFERENCE.sub(replace, text), expanded, problems


def line_of(node: Node) -> int:
    return node.start_mark.line + 1


def _kind(node: Node) -> str:
    return "list" if isinstance(node, SequenceNode) else "mapping"


_SECRET_KEYS = frozenset({"token"})  # keys whose bad values never reach messages or logs


class Reader:
    """Turns nodes into values for one file and collects every problem found."""

    def __init__(self, *, filename: str, env: Mapping[str, str], loader: yaml.SafeLoader) -> None:
        self.filename = filename
        self.env = env
        self.loader = loader
        self.problems: list[Problem] = []

    def problem(self, line: int, key: str, message: str) -> None:
        if key.rsplit(".", 1)[-1] in _SECRET_KEYS and ", got " in message:
            message = message.split(", got ", 1)[0] + ", got a value that is not shown (a secret)"
        self.problems.append(Problem(file=self.filename, line=line, key=key, message=message))

    def scalar(self, node: Node, key: str) -> Scalar | None:
        """The typed value of `node`, or None after reporting why there is none."""
        if not isinstance(node, ScalarNode):
            return Scalar(value=Collection(_kind(node)), text="")
        text, expanded, problems = interpolate(node.value, self.env)
        for message in problems:
            self.problem(line_of(node), key, message)
        if problems:
            return None
        tag = node.tag
        if expanded and tag == _STR_TAG:
            tag = self.loader.resolve(ScalarNode, text, (True, False))
        typed = ScalarNode(tag, text, node.start_mark, node.end_mark)
        try:
            value = self.loader.construct_object(typed, deep=True)
        except (yaml.YAMLError, ValueError) as exc:
            detail = getattr(exc, "problem", None) or str(exc)
            self.problem(line_of(node), key, f"unsupported value: {detail}")
            return None
        return Scalar(value=value, text=text, interpolated=expanded)

    def convert(self, node: Node, key: str, convert: Convert[T]) -> T | Invalid:
        """Converted value, or an `Invalid` (already reported) when it does not fit."""
        scalar = self.scalar(node, key)
        if scalar is None:
            return Invalid("reported")
        try:
            return convert(scalar)
        except Invalid as exc:
            self.problem(line_of(node), key, str(exc))
            return exc

    def section(
        self, node: Node | None, *, key: str, line: int, cls: type, exclude: Sequence[str] = ()
    ) -> Section:
        """A mapping whose allowed keys are the fields of `cls` (minus `exclude`)."""
        keys = tuple(f.name for f in dataclasses.fields(cls) if f.name not in exclude)
        if node is None or (isinstance(node, ScalarNode) and node.tag == _NULL_TAG):
            return Section(self, key=key, line=line, keys=keys)
        if not isinstance(node, MappingNode):
            got = self.scalar(node, key)
            shown = got.show() if got is not None else "an invalid value"
            self.problem(line_of(node), key, f"expected a mapping with keys {', '.join(keys)}, got {shown}")
            return Section(self, key=key, line=line, keys=keys)
        explicit, merged = self._flatten(node, key)
        return Section(self, explicit, merged, key=key, line=line, keys=keys)

    def _flatten(self, node: MappingNode, key: str) -> tuple[list[Pair], list[Pair]]:
        """The mapping's own entries, and those merged in with `<<: *anchor` (which they override)."""
        explicit = [pair for pair in node.value if pair[0].tag != _MERGE_TAG]
        try:
            self.loader.flatten_mapping(node)
        except yaml.YAMLError as exc:
            self.problem(line_of(node), key, f"invalid merge (<<): {getattr(exc, 'problem', exc)}")
            return explicit, []
        return explicit, node.value[: len(node.value) - len(explicit)]


class Section:
    """One mapping of the file: hands out converted values, reports unknown keys."""

    def __init__(
        self,
        reader: Reader,
        explicit: Sequence[Pair] = (),
        merged: Sequence[Pair] = (),
        *,
        key: str,
        line: int,
        keys: tuple[str, ...],
    ) -> None:
        self.reader = reader
        self.key = key
        self.line = line
        self.keys = keys
        self.entries: dict[str, Pair] = {}
        for key_node, value_node in explicit:
            self._add(key_node, value_node, overridable=False)
        for key_node, value_node in merged:
            self._add(key_node, value_node, overridable=True)

    def _add(self, key_node: Node, value_node: Node, *, overridable: bool) -> None:
        name = str(key_node.value) if isinstance(key_node, ScalarNode) else f"<{_kind(key_node)}>"
        if name in self.entries and overridable:
            return
        line, key = line_of(key_node), self.child(name)
        if name in self.entries:
            first = line_of(self.entries[name][0])
            self.reader.problem(line, key, f"duplicate key (first set at line {first})")
        elif name not in self.keys:
            self.reader.problem(line, key, f"unknown key (expected one of: {', '.join(self.keys)})")
        else:
            self.entries[name] = (key_node, value_node)

    def child(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def has(self, name: str) -> bool:
        return name in self.entries

    def line_of(self, name: str) -> int:
        entry = self.entries.get(name)
        return line_of(entry[0]) if entry else self.line

    def problem(self, name: str, message: str) -> None:
        self.reader.problem(self.line_of(name), self.child(name), message)

    def value(self, name: str, convert: Convert[T], default: T) -> T:
        """The converted value of `name`; `default` when absent or invalid (reported)."""
        entry = self.entries.get(name)
        if entry is None:
            return default
        result = self.reader.convert(entry[1], self.child(name), convert)
        return default if isinstance(result, Invalid) else result

    def required(self, name: str, convert: Convert[T], placeholder: T, hint: str) -> T:
        if name not in self.entries:
            self.reader.problem(self.line, self.child(name), f"missing required key: {hint}")
        return self.value(name, convert, placeholder)

    def fields(self, **converters: Convert[Any]) -> dict[str, Any]:
        """Keyword arguments for the present, valid keys; dataclass defaults fill the rest."""
        found: dict[str, Any] = {}
        for name, convert in converters.items():
            if name in self.entries:
                result = self.reader.convert(self.entries[name][1], self.child(name), convert)
                if not isinstance(result, Invalid):
                    found[name] = result
        return found

    def section(self, name: str, cls: type, exclude: Sequence[str] = ()) -> Section:
        entry = self.entries.get(name)
        node = entry[1] if entry else None
        key, line = self.child(name), self.line_of(name)
        return self.reader.section(node, key=key, line=line, cls=cls, exclude=exclude)

    def items(self, name: str, convert: Convert[T], expected: str) -> list[Item[T]] | None:
        """The converted elements of a list; None when absent or when any is invalid."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        node = entry[1]
        if not isinstance(node, SequenceNode):
            got = self.reader.scalar(node, self.child(name))
            if got is not None:
                self.problem(name, f"expected a list of {expected}, got {got.show()}")
            return None
        items = [self._item(name, index, element, convert) for index, element in enumerate(node.value)]
        return None if any(item is None for item in items) else [item for item in items if item is not None]

    def _item(self, name: str, index: int, node: Node, convert: Convert[T]) -> Item[T] | None:
        key = f"{self.child(name)}[{index}]"
        result = self.reader.convert(node, key, convert)
        return None if isinstance(result, Invalid) else Item(value=result, line=line_of(node), key=key)


def string_text(scalar: Scalar) -> str | None:
    """The text of a string value (interpolated values count as strings), else None."""
    if scalar.interpolated or isinstance(scalar.value, str):
        return scalar.text
    return None


def _check_range(value: float, low: float | None, high: float | None, shown: str) -> None:
    if low is not None and high is not None and not low <= value <= high:
        raise Invalid(f"must be between {low:g} and {high:g}, got {shown}")
    if low is not None and value < low:
        raise Invalid(f"must be at least {low:g}, got {shown}")


def integer(low: int | None = None, high: int | None = None) -> Convert[int]:
    def convert(scalar: Scalar) -> int:
        if type(scalar.value) is not int:
            raise Invalid(f"expected an integer, got {scalar.show()}")
        _check_range(scalar.value, low, high, scalar.show())
        return scalar.value

    return convert


def fraction(scalar: Scalar) -> float:
    """A number strictly between 0 and 1 (an error rate)."""
    value = scalar.value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(f"expected a number, got {scalar.show()}")
    if not 0 < value < 1:
        raise Invalid(f"must be greater than 0 and less than 1, got {scalar.show()}")
    return float(value)


def duration(*, positive: bool) -> Convert[float]:
    def convert(scalar: Scalar) -> float:
        if isinstance(scalar.value, (bool, Collection)) or scalar.value is None:
            raise Invalid(f"expected a duration {DURATION_EXAMPLES}, got {scalar.show()}")
        try:
            seconds = parse_duration(scalar.value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if positive and seconds <= 0:
            raise Invalid(f"must be greater than 0, got {scalar.show()}")
        return seconds

    return convert


_BYTE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_BYTE_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
BYTE_SIZE_EXAMPLES = "such as 512KiB, 1MiB, 2MB or a number of bytes"


def byte_size(low: int, high: int) -> Convert[int]:
    """A size in bytes: a whole number, or text such as "512KiB", "1MiB", "2MB"."""

    def convert(scalar: Scalar) -> int:
        value = scalar.value
        if type(value) is int:
            size = value
        else:
            match = _BYTE_SIZE.fullmatch(scalar.text) if isinstance(value, str) else None
            unit = match.group(2).lower() if match else ""
            if match is None or unit not in _BYTE_UNITS:
                raise Invalid(f"expected a size {BYTE_SIZE_EXAMPLES}, got {scalar.show()}")
            size = int(float(match.group(1)) * _BYTE_UNITS[unit])
        if not low <= size <= high:
            raise Invalid(f"must be between {low} and {high} bytes, got {scalar.show()}")
        return size

    return convert


def boolean(scalar: Scalar) -> bool:
    if not isinstance(scalar.value, bool):
        raise Invalid(f"expected true or false, got {scalar.show()}")
    return scalar.value


def string(*, empty_ok: bool) -> Convert[str]:
    def convert(scalar: Scalar) -> str:
        text = string_text(scalar)
        if text is None and scalar.value is None and empty_ok:
            text = ""
        if text is None:
            raise Invalid(f"expected a string, got {scalar.show()} (put it in quotes)")
        if not text and not empty_ok:
            raise Invalid("must not be empty")
        return text

    return convert


def choice(*options: str) -> Convert[str]:
    def convert(scalar: Scalar) -> str:
        text = string_text(scalar)
        if text not in options:
            raise Invalid(f"must be one of {', '.join(options)}, got {scalar.show()}")
        return text

    return convert
