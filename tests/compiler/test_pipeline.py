"""Tests for the pipeline language: parsing, positions, error messages with carets, and building passes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bevel.compiler.pipeline import PassCall, Pipeline, Span, build_pipeline, format_caret, parse_pipeline
from bevel.errors import ParamError, PipelineError
from bevel.passes.base import Pass, PassParams, param
from bevel.passes.registry import register_pass


@register_pass("test.pipe.alpha")
class Alpha(Pass):
    """A test pass with one parameter of each kind."""

    @dataclass
    class Params(PassParams):
        ratio: float = param(0.5, "fraction to remove", ge=0.0, lt=1.0)
        skip: tuple[str, ...] = param((), "names to leave alone")
        mode: str = param("a", "which variant", choices=("a", "b"))
        n: int | None = param(None, "an optional count")


@register_pass("test.pipe.beta")
class Beta(Pass):
    """A test pass without parameters."""


def caret(message: str) -> tuple[int, int]:
    """(index of the first '^', number of '^') on the last line of an error message."""
    last = message.splitlines()[-1]
    return last.index("^"), last.count("^")


def error_of(spec, kind: type[Exception] = PipelineError) -> str:
    with pytest.raises(kind) as info:
        build_pipeline(spec)
    return str(info.value)


# --- parsing values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("0", 0), ("42", 42), ("-7", -7), ("+3", 3),
    ("1.5", 1.5), ("-0.25", -0.25), (".5", 0.5), ("2.", 2.0), ("1e-3", 1e-3), ("-2.5E+4", -2.5e4), ("3e2", 300.0),
    ("true", True), ("True", True), ("false", False), ("False", False), ("none", None), ("None", None),
    ('"hi"', "hi"), ("'hi'", "hi"), ('""', ""),
    (r'"a\"b"', 'a"b'), (r"'a\'b'", "a'b"), (r'"tab\there"', "tab\there"), (r'"line\nbreak"', "line\nbreak"),
    (r'"back\\slash"', "back\\slash"), (r'"it\'s"', "it's"), ("'say \"hi\"'", 'say "hi"'),
    ("[]", []), ("[1, 2, 3]", [1, 2, 3]), ("[1, 2,]", [1, 2]), ('["a", \'b\']', ["a", "b"]),
    ("[[1, [2.5]], [], [none, true]]", [[1, [2.5]], [], [None, True]]),
])
def test_every_value_kind_parses(text: str, value) -> None:
    [call] = parse_pipeline(f"p(x={text})")
    assert call.params == {"x": value}
    assert type(call.params["x"]) is type(value)


def test_whitespace_and_newlines_between_tokens() -> None:
    text = "\n  a . b ( x = 1 ,\n\ty = [ 1 ,\n 2 , ] , ) \n|\n c\n"
    with pytest.raises(PipelineError):  # a space inside a dotted name splits it
        parse_pipeline(text)
    calls = parse_pipeline(text.replace("a . b", "a.b"))
    assert [c.name for c in calls] == ["a.b", "c"]
    assert calls[0].params == {"x": 1, "y": [1, 2]}


def test_several_passes_and_both_bare_forms() -> None:
    calls = parse_pipeline("cleanup | prune.magnitude(ratio=0.3) | quantize.int8_weight() | tome(r=8, skip=[])")
    assert [c.name for c in calls] == ["cleanup", "prune.magnitude", "quantize.int8_weight", "tome"]
    assert [c.params for c in calls] == [{}, {"ratio": 0.3}, {}, {"r": 8, "skip": []}]


def test_positions_on_a_multiline_pipeline() -> None:
    text = 'cleanup\n| prune.magnitude(ratio=0.3,\n    skip=["head", "embed"])\n|   tome'
    cleanup, prune, tome = parse_pipeline(text)
    assert cleanup.name_span == Span(1, 1, 8)
    assert prune.name_span == Span(2, 3, 18)
    assert prune.key_spans == {"ratio": Span(2, 19, 24), "skip": Span(3, 5, 9)}
    assert prune.value_spans == {"ratio": Span(2, 25, 28), "skip": Span(3, 10, 27)}
    assert tome.name_span == Span(4, 5, 9)
    assert isinstance(tome, PassCall) and tome.params == {}


def test_format_caret_marks_the_span() -> None:
    text = "a\nbb(x=123)\n"
    assert format_caret(text, Span(2, 6, 9)) == "bb(x=123)\n     ^^^"
    assert format_caret(text, Span(2, 10, 10)) == "bb(x=123)\n         ^"  # at least one caret


# --- syntax errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, line, column, words", [
    ("prune.magnitude(ratio=)", 1, 23, "expected a parameter value after '='"),
    ("prune.magnitude(ratio=0.3", 1, 16, "unclosed '('"),
    ("tome(skip=[1, 2", 1, 11, "unclosed '['"),
    ("cleanup % tome", 1, 9, "unexpected character '%'"),
    ("cleanup tome", 1, 9, "expected '(', '|' or the end of the pipeline, found 'tome'"),
    ("cleanup | | tome", 1, 11, "expected a pass name after '|'"),
    ("cleanup |", 1, 10, "expected a pass name after '|', found the end of the pipeline"),
    ("tome(r 8)", 1, 8, "expected '=' after the parameter name"),
    ("tome(r=8 s=1)", 1, 10, "expected ',' or ')', found 's'"),
    ("tome(r=[1 2])", 1, 11, "expected ',' or ']'"),
    ("tome(r=mlp)", 1, 8, 'strings need quotes, e.g. "mlp"'),
    ('tome(target="mlp)', 1, 13, "unclosed string"),
    ("Cleanup", 1, 1, "expected a pass name, found 'Cleanup'"),
    ("cleanup\n| tome(r=8,\n  s=)", 3, 5, "expected a parameter value after '='"),
])
def test_syntax_error_names_the_place_and_shows_a_caret(text: str, line: int, column: int, words: str) -> None:
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    message = str(info.value)
    first, source, _ = message.splitlines()
    assert first.startswith(f"pipeline syntax error at line {line}, column {column}: ")
    assert words in first
    assert source == text.split("\n")[line - 1]
    assert caret(message)[0] == column - 1
    assert info.value.__cause__ is None and type(info.value) is PipelineError


@pytest.mark.parametrize("text", ["", "   ", "\n\n"])
def test_empty_pipeline(text: str) -> None:
    with pytest.raises(PipelineError, match="empty pipeline"):
        parse_pipeline(text)


def test_duplicate_key_points_at_the_second() -> None:
    with pytest.raises(PipelineError) as info:
        parse_pipeline("tome(r=1, s=2, r=3)")
    message = str(info.value)
    assert "'r' is given twice" in message
    assert caret(message) == (15, 1)


def test_unknown_escape_is_a_syntax_error() -> None:
    with pytest.raises(PipelineError, match=r"unknown escape '\\q'") as info:
        parse_pipeline(r'p(path="C:\q")')
    assert caret(str(info.value)) == (10, 2)


# --- building passes --------------------------------------------------------------------------------

def test_build_resolves_names_and_validates_params() -> None:
    alpha, beta = build_pipeline("test.pipe.alpha(ratio=0, skip=['head', \"embed\"], n=3) | test.pipe.beta")
    assert isinstance(alpha, Alpha) and isinstance(beta, Beta)
    assert alpha.params.as_dict() == {"ratio": 0.0, "skip": ("head", "embed"), "mode": "a", "n": 3}


def test_unknown_pass_suggests_the_nearest_name() -> None:
    message = error_of("test.pipe.beta | test.pipe.alpah(ratio=0.1)")
    assert message.startswith("pipeline error at line 1, column 18: "
                              "unknown pass 'test.pipe.alpah'; did you mean 'test.pipe.alpha'?")
    assert message.splitlines()[-2] == "test.pipe.beta | test.pipe.alpah(ratio=0.1)"
    assert caret(message) == (17, len("test.pipe.alpah"))


def test_unknown_param_suggests_the_nearest_and_points_at_the_key() -> None:
    with pytest.raises(ParamError) as info:
        build_pipeline("test.pipe.alpha(ratoi=0.1)")
    message = str(info.value)
    assert info.value.key == "ratoi"
    assert message.startswith("pipeline error at line 1, column 17: ")
    assert "has no parameter 'ratoi'; did you mean 'ratio'?" in message
    assert caret(message) == (16, 5)


def test_out_of_range_value_names_the_range_and_points_at_the_value() -> None:
    with pytest.raises(ParamError) as info:
        build_pipeline("test.pipe.beta |\n  test.pipe.alpha(mode='b', ratio=1.5)")
    message = str(info.value)
    assert info.value.key == "ratio"
    assert "ratio" in message and "[0.0, 1.0)" in message
    assert message.startswith("pipeline error at line 2, column 35: ")
    assert message.splitlines()[-2] == "  test.pipe.alpha(mode='b', ratio=1.5)"
    assert caret(message) == (34, 3)


def test_name_and_parameter_errors_on_a_later_line_say_which_line() -> None:
    # The caret shows only the faulty line; on a multi-line pipeline the words say which one it is.
    text = "test.pipe.beta |\n test.pipe.beta |\n\ttest.pipe.gamma"
    message = error_of(text)
    assert message.startswith("pipeline error at line 3, column 2: unknown pass 'test.pipe.gamma'")
    assert message.splitlines()[-2:] == ["\ttest.pipe.gamma", "\t" + "^" * len("test.pipe.gamma")]

    with pytest.raises(ParamError) as info:
        build_pipeline("test.pipe.beta\n| test.pipe.alpha(\n    n=2,\n    mdoe='a')")
    message = str(info.value)
    assert message.startswith("pipeline error at line 4, column 5: pass 'test.pipe.alpha' has no parameter 'mdoe'")
    assert message.splitlines()[-2:] == ["    mdoe='a')", "    ^^^^"]


@pytest.mark.parametrize("text, key, words, column", [
    ('test.pipe.alpha(n="three")', "n", "expected int | None", 18),
    ("test.pipe.alpha(ratio=[1])", "ratio", "expected float", 22),
    ("test.pipe.alpha(mode='c')", "mode", "not one of 'a', 'b'", 21),
    ("test.pipe.alpha(skip=[1, 2])", "skip", "expected tuple", 21),
])
def test_wrong_value_points_at_the_value(text: str, key: str, words: str, column: int) -> None:
    with pytest.raises(ParamError) as info:
        build_pipeline(text)
    assert info.value.key == key
    assert words in str(info.value)
    assert caret(str(info.value))[0] == column


def test_list_mixes_strings_and_pass_instances() -> None:
    mine = Alpha(ratio=0.2)
    passes = build_pipeline(["test.pipe.beta | test.pipe.alpha(ratio=0.1)", mine, "test.pipe.beta"])
    assert [type(p) for p in passes] == [Beta, Alpha, Alpha, Beta]
    assert passes[2] is mine
    assert passes[1].params.ratio == 0.1
    assert build_pipeline(mine) == [mine]
    assert len(build_pipeline(("test.pipe.beta", Pipeline("test.pipe.beta | test.pipe.beta")))) == 3


@pytest.mark.parametrize("spec, words", [
    ([], "empty pipeline"),
    (["test.pipe.beta", 3], "item 1 is a int"),
    ([Alpha], "pass class Alpha"),
    ([None], "NoneType"),
    (42, "got int"),
])
def test_bad_specs(spec, words: str) -> None:
    assert words in error_of(spec)


@pytest.mark.parametrize("text, words", [
    ("attention.window | kv.evict", "passes 'attention.window' and 'kv.evict' cannot be in the same pipeline"),
    ("kv.quantize | attention.block_sparse(density=0.5)",
     "passes 'kv.quantize' and 'attention.block_sparse' cannot be in the same pipeline"),
    # twice, the step graph would round the cache twice and the decode loop once
    ("kv.quantize(bits=8) | kv.quantize(bits=4)", "pass 'kv.quantize' can appear only once in a pipeline"),
    # twice, the second window or budget replaced the first (the last won), while both reported "applied"
    ("attention.window(window=8) | attention.window(window=32)",
     "pass 'attention.window' can appear only once in a pipeline"),
    ("kv.evict(budget=8) | kv.evict(budget=32)", "pass 'kv.evict' can appear only once in a pipeline"),
])
def test_a_pipeline_of_conflicting_passes_is_refused_when_built(text: str, words: str) -> None:
    with pytest.raises(PipelineError, match=words):
        Pipeline(text)


def test_pipeline_str_round_trips() -> None:
    pipeline = Pipeline("test.pipe.beta | test.pipe.alpha(ratio=0.25, skip=['a\"b', 'c\\\\d'], mode=\"b\", n=-2)"
                        " | test.pipe.alpha()")
    assert len(pipeline) == 3 and [type(p) for p in pipeline] == [Beta, Alpha, Alpha]
    text = str(pipeline)
    assert text.startswith("test.pipe.beta | test.pipe.alpha(ratio=0.25, ") and text.endswith(" | test.pipe.alpha")
    again = Pipeline.parse(text)
    assert str(again) == text
    assert [p.name for p in again] == [p.name for p in pipeline]
    assert [p.params.as_dict() for p in again] == [p.params.as_dict() for p in pipeline]


# --- property: rendered pipelines parse back to what was rendered -----------------------------------

_LOWER = "abcdefghijklmnopqrstuvwxyz_"
_segment = st.builds(str.__add__, st.sampled_from(_LOWER), st.text(_LOWER + "0123456789", max_size=6))
_names = st.lists(_segment, min_size=1, max_size=3).map(".".join)
_keys = st.builds(str.__add__, st.sampled_from(_LOWER + "XYZ"), st.text(_LOWER + "XYZ0189", max_size=6))
_scalars = (st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False) | st.booleans()
            | st.none() | st.text(max_size=12))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=8)
_gaps = st.sampled_from(["", " ", "  ", "\n", " \t\n "])


@st.composite
def _rendered(draw, value) -> str:
    if isinstance(value, bool):
        return draw(st.sampled_from(["true", "True"] if value else ["false", "False"]))
    if value is None:
        return draw(st.sampled_from(["none", "None"]))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        quote = draw(st.sampled_from(['"', "'"]))
        escaped = (value.replace("\\", "\\\\").replace(quote, "\\" + quote)
                   .replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r"))
        return quote + escaped + quote
    items = [draw(_rendered(v)) for v in value]
    trailing = "," if items and draw(st.booleans()) else ""
    return "[" + ", ".join(items) + trailing + draw(_gaps) + "]"


@st.composite
def _pipelines(draw) -> tuple[str, list[tuple[str, dict]]]:
    calls = draw(st.lists(st.tuples(_names, st.dictionaries(_keys, _values, max_size=4)), min_size=1, max_size=4))
    parts = []
    for name, params in calls:
        if params:
            args = [f"{draw(_gaps)}{k}{draw(_gaps)}={draw(_gaps)}{draw(_rendered(v))}" for k, v in params.items()]
            trailing = "," if draw(st.booleans()) else ""
            parts.append(f"{name}{draw(_gaps)}(" + ",".join(args) + trailing + draw(_gaps) + ")")
        else:
            parts.append(name + draw(st.sampled_from(["", "()", "( )"])))
    text = draw(_gaps) + (draw(_gaps) + "|" + draw(_gaps)).join(parts) + draw(_gaps)
    return text, calls


def _same(a, b) -> bool:
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return isinstance(b, float) and (a == b) and math.copysign(1, a) == math.copysign(1, b)
    return type(a) is type(b) and a == b


@settings(max_examples=100, deadline=None)
@given(_pipelines())
def test_rendered_pipelines_parse_back(case) -> None:
    text, calls = case
    parsed = parse_pipeline(text)
    assert [c.name for c in parsed] == [name for name, _ in calls]
    for got, (_, params) in zip(parsed, calls):
        assert list(got.params) == list(params)
        assert all(_same(params[k], got.params[k]) for k in params), (text, got.params, params)
