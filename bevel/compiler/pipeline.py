"""The pipeline language: parse ``a | b(x=1)`` into pass calls, and build Pass objects from text or lists.

Every error points into the pipeline text with its line, its column and a caret.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from bevel.errors import ParamError, PipelineError
from bevel.passes.base import Pass
from bevel.passes.registry import get_pass


@dataclass(frozen=True)
class Span:
    """Where a piece of pipeline text sits: 1-based line and columns, ``end_column`` exclusive."""

    line: int
    column: int
    end_column: int


@dataclass
class PassCall:
    """One parsed ``name(key=value, ...)``, with the spans that errors point at."""

    name: str
    params: dict[str, Any]
    name_span: Span
    key_spans: dict[str, Span] = field(default_factory=dict)
    value_spans: dict[str, Span] = field(default_factory=dict)


def format_caret(text: str, span: Span) -> str:
    """The source line holding ``span`` and, under it, a ``^`` for each column of the span (at least one)."""
    lines = text.split("\n")
    source = lines[span.line - 1].rstrip("\r") if 0 < span.line <= len(lines) else ""
    before = source[:span.column - 1]
    # Keep tabs as tabs so the caret lines up however the terminal renders them.
    indent = "".join("\t" if ch == "\t" else " " for ch in before) + " " * (span.column - 1 - len(before))
    return f"{source}\n{indent}{'^' * max(1, span.end_column - span.column)}"


def parse_pipeline(text: str) -> list[PassCall]:
    """Parse pipeline text into pass calls, checking syntax only (pass and parameter names are not looked up)."""
    if not isinstance(text, str):
        raise PipelineError(f"a pipeline text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise PipelineError("empty pipeline: give at least one pass, e.g. 'cleanup' or "
                            "'cleanup | prune.magnitude(sparsity=0.3)'")
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as error:
        raise _syntax_error(text, error) from None
    return [_pass_call(text, node) for node in tree.children]


def build_pipeline(spec: str | Pass | Pipeline | list[str | Pass] | tuple[str | Pass, ...]) -> list[Pass]:
    """Turn a pipeline string, a Pass, or a list of strings and Pass instances into Pass objects, in order.

    Names are looked up in the registry and parameters validated; any fault raises before anything runs.
    """
    if isinstance(spec, (str, Pass, Pipeline)):
        items: list[Any] = [spec]
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        raise PipelineError(f"a pipeline must be a string, a Pass or a list of them, got {type(spec).__name__}")
    if not items:
        raise PipelineError("empty pipeline: the list holds no passes")
    passes: list[Pass] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            passes.extend(_instantiate(item, call) for call in parse_pipeline(item))
        elif isinstance(item, Pass):
            passes.append(item)
        elif isinstance(item, Pipeline):
            passes.extend(item.passes)
        elif isinstance(item, type) and issubclass(item, Pass):
            raise PipelineError(f"pipeline item {index} is the pass class {item.__name__}, not a pass; "
                                f"write {item.__name__}() or the string '{item.name}'")
        else:
            raise PipelineError(f"pipeline item {index} is a {type(item).__name__}; "
                                f"each item must be a pipeline string or a Pass instance")
    return passes


def check_composition(passes: list[Pass]) -> None:
    """Refuse passes whose declared requirements (a pass that must come earlier), conflicts (passes
    that may not share a pipeline; a pass conflicting with itself may appear only once) or order (a
    pass that may not come after another) are not met."""
    names = [p.name for p in passes]
    for i, p in enumerate(passes):
        for required in p.requires:
            if required not in names[:i]:
                raise PipelineError(f"pass '{p.name}' requires '{required}' earlier in the pipeline; "
                                    f"write '{required} | {p.name}'")
        for other in p.conflicts:
            if other == p.name and names.count(other) > 1:  # a pass that may run once
                raise PipelineError(f"pass '{p.name}' can appear only once in a pipeline")
            if other != p.name and other in names:
                raise PipelineError(f"passes '{p.name}' and '{other}' cannot be in the same pipeline")
        for later, why in p.not_followed_by:
            if later in names[i + 1:]:
                raise PipelineError(f"pass '{later}' cannot come after '{p.name}' ({why}); write "
                                    f"'{later} | {p.name}'")


class Pipeline:
    """An ordered list of passes; ``str()`` gives the canonical text, which parses back to the same passes.
    Building one checks the passes' requirements and conflicts, as ``bevel.compile`` does."""

    def __init__(self, spec: str | Pass | Pipeline | list[str | Pass] | tuple[str | Pass, ...]) -> None:
        self.passes: list[Pass] = build_pipeline(spec)
        check_composition(self.passes)

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        """Build a pipeline from its text form."""
        return cls(text)

    def __iter__(self) -> Iterator[Pass]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __str__(self) -> str:
        return " | ".join(repr(p) for p in self.passes)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"


# --- parsing ---------------------------------------------------------------------------------------

@functools.cache
def _parser() -> Lark:
    return Lark.open("pipeline.lark", rel_to=__file__, parser="lalr", propagate_positions=True,
                     maybe_placeholders=True)


def _pass_call(text: str, node: Tree) -> PassCall:
    name_token, args = node.children
    call = PassCall(name=str(name_token), params={}, name_span=_token_span(name_token))
    for param in args.children if args is not None else []:
        if param is None:  # "name()"
            continue
        key_token, value = param.children
        key, key_span = str(key_token), _token_span(key_token)
        if key in call.params:
            first = call.key_spans[key]
            raise PipelineError(f"parameter '{key}' is given twice to pass '{call.name}' at line {key_span.line}, "
                                f"column {key_span.column} (first at line {first.line}, column {first.column})\n"
                                + format_caret(text, key_span))
        call.params[key] = _value(text, value)
        call.key_spans[key] = key_span
        call.value_spans[key] = _node_span(text, value)
    return call


def _value(text: str, node: Token | Tree) -> Any:
    if isinstance(node, Tree):  # a list
        return [_value(text, child) for child in node.children if child is not None]
    if node.type == "NUMBER":
        return float(node) if any(c in node for c in ".eE") else int(node)
    if node.type == "STRING":
        return _unescape(text, node)
    return {"TRUE": True, "FALSE": False, "NONE": None}[node.type]


_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r"}


def _unescape(text: str, token: Token) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(1) not in _ESCAPES:
            column = token.column + 1 + match.start()
            raise PipelineError(
                f"pipeline syntax error at line {token.line}, column {column}: unknown escape "
                f"'\\{match.group(1)}' in a string (known: \\\\ \\\" \\' \\n \\t \\r; write \\\\ for a backslash)\n"
                + format_caret(text, Span(token.line, column, column + 2)))
        return _ESCAPES[match.group(1)]

    return re.sub(r"\\(.)", replace, token[1:-1])


def _token_span(token: Token) -> Span:
    return Span(token.line, token.column, token.end_column)


def _node_span(text: str, node: Token | Tree) -> Span:
    if isinstance(node, Token):
        return _token_span(node)
    meta = node.meta
    if meta.end_line == meta.line:
        return Span(meta.line, meta.column, meta.end_column)
    # A list over several lines: mark from its '[' to the end of that line.
    return Span(meta.line, meta.column, len(text.split("\n")[meta.line - 1]) + 1)


# --- syntax errors ---------------------------------------------------------------------------------

_VALUE_TERMINALS = {"NUMBER", "STRING", "TRUE", "FALSE", "NONE", "LSQB"}
_CLOSERS = {"(": "RPAR", "[": "RSQB"}


def _syntax_error(text: str, error: UnexpectedInput) -> PipelineError:
    """Turn a lark exception into a PipelineError saying, in words, what was expected where."""
    if isinstance(error, UnexpectedCharacters):
        offset = error.pos_in_stream
        char = text[offset]
        if char in "\"'":
            what = f"unclosed string: no closing {char} before the end of the line"
        else:
            what = f"unexpected character {char!r}; {_expected(text, offset, set(error.allowed or ()))}"
    elif isinstance(error, UnexpectedToken) and error.token.type != "$END":
        offset = error.token.start_pos
        what = f"{_expected(text, offset, set(error.expected))}, found {_shown(error.token)}"
        what += _hint(error.token, set(error.expected))
    else:  # the text ended too early
        offset = len(text.rstrip())
        expected = set(getattr(error, "expected", ()) or ())
        brackets = _open_brackets(text, offset)
        if brackets and _CLOSERS[brackets[-1][0]] in expected:
            bracket, offset = brackets[-1]
            closer = ")" if bracket == "(" else "]"
            what = f"unclosed '{bracket}' (no matching '{closer}' before the end of the pipeline)"
        else:
            what = f"{_expected(text, offset, expected)}, found the end of the pipeline"
    line, column = _position(text, offset)
    return PipelineError(f"pipeline syntax error at line {line}, column {column}: {what}\n"
                         + format_caret(text, Span(line, column, column + 1)))


def _expected(text: str, offset: int, expected: set[str]) -> str:
    """What the parser wanted at ``offset``, in words. The innermost open bracket tells a list from a call,
    which the LALR tables alone do not (the two share states)."""
    brackets = _open_brackets(text, offset)
    in_list = bool(brackets) and brackets[-1][0] == "["
    if "NAME" in expected:
        return "expected a pass name after '|'" if text[:offset].strip() else "expected a pass name"
    if "EQUAL" in expected:
        return "expected '=' after the parameter name"
    if expected & _VALUE_TERMINALS:
        return "expected a list item or ']'" if in_list else "expected a parameter value after '='"
    if "KEY" in expected:
        return "expected a parameter name or ')'"
    if "COMMA" in expected:
        return "expected ',' or ']'" if in_list else "expected ',' or ')'"
    if "LPAR" in expected:
        return "expected '(', '|' or the end of the pipeline"
    return "expected '|' or the end of the pipeline"


def _shown(token: Token) -> str:
    value = str(token)
    return repr(value if len(value) <= 30 else value[:27] + "...")


def _hint(token: Token, expected: set[str]) -> str:
    if token.type in ("NAME", "KEY") and expected & _VALUE_TERMINALS:
        return f"; strings need quotes, e.g. \"{token}\""
    if token.type == "KEY" and "NAME" in expected:
        return "; pass names are lowercase words joined by dots, e.g. 'prune.magnitude'"
    return ""


def _open_brackets(text: str, end: int) -> list[tuple[str, int]]:
    """The brackets still open at ``end`` (innermost last), with their offsets; quoted text is skipped."""
    stack: list[tuple[str, int]] = []
    quote = None
    i = 0
    while i < end:
        char = text[i]
        if quote:
            if char == "\\":
                i += 1
            elif char in (quote, "\n"):
                quote = None
        elif char in "\"'":
            quote = char
        elif char in "([":
            stack.append((char, i))
        elif char in ")]" and stack:
            stack.pop()
        i += 1
    return stack


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, column


# --- building passes -------------------------------------------------------------------------------

def _instantiate(text: str, call: PassCall) -> Pass:
    """Look up one parsed call and validate its parameters, pointing errors at the name, key or value."""
    try:
        cls = get_pass(call.name)
    except PipelineError as error:
        raise PipelineError(_located(text, call.name_span, error)) from None
    try:
        params = cls.Params.from_dict(call.params, call.name)
    except ParamError as error:
        if error.key in call.value_spans and error.key in cls.Params.names():
            span = call.value_spans[error.key]  # a known parameter with a bad value
        else:
            span = call.key_spans.get(error.key, call.name_span)
        raise ParamError(_located(text, span, error), key=error.key) from None
    return cls(params)


def _located(text: str, span: Span, error: Exception) -> str:
    """``error``'s message with where it is in the pipeline: the line and column in words, then the caret
    (the caret alone does not say which line of a multi-line pipeline it is under)."""
    return f"pipeline error at line {span.line}, column {span.column}: {error}\n{format_caret(text, span)}"
