"""The pass interface: Params validated however they are made, errors naming the right pass, registry checks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from bevel.errors import ParamError
from bevel.passes import Pass, PassParams, get_pass, param, register_pass
from bevel.passes.prune.magnitude import GlobalMagnitudePrune


@register_pass("test.base.plain")
class Plain(Pass):
    """A pass without parameters."""


@register_pass("test.base.sub_prune")
class SubPrune(GlobalMagnitudePrune):
    """Reuses prune.magnitude's parameters."""


def test_params_made_directly_are_validated_and_name_the_pass():
    with pytest.raises(ParamError, match=r"prune\.magnitude\(sparsity=\.\.\.\): 1\.5 is out of range"):
        GlobalMagnitudePrune(GlobalMagnitudePrune.Params(sparsity=1.5))
    assert GlobalMagnitudePrune.Params(skip=["a.*"]).skip == ("a.*",)  # a list where a tuple is declared


@pytest.mark.parametrize("spec,key", [("prune.magnitude", "sparsity"), ("quantize.int8_dynamic", "smooth"),
                                      ("lowrank", "energy")])
def test_nan_is_refused_where_a_number_in_range_is_expected(spec, key):
    """NaN fails every comparison, so a range check alone would let it through."""
    with pytest.raises(ParamError, match=rf"{spec.replace('.', '[.]')}\({key}=\.\.\.\): nan is not a number; {key} "
                                         rf"must be in"):
        get_pass(spec)(**{key: float("nan")})


def test_a_subclass_reusing_params_gets_its_own_name_and_leaves_the_parents():
    with pytest.raises(ParamError, match=r"test\.base\.sub_prune\(sparsity"):
        SubPrune(sparsity=2.0)
    with pytest.raises(ParamError, match=r"^prune\.magnitude\(sparsity"):
        get_pass("prune.magnitude")(sparsity=2.0)
    assert "min_keep" in SubPrune.Params.names()


def test_a_pass_without_params_refuses_any_and_unrelated_params_are_unnamed():
    with pytest.raises(ParamError, match="pass 'test.base.plain' has no parameter 'x'"):
        Plain(x=1)

    @dataclass
    class Loose(PassParams):
        n: int = param(1, "a count", ge=0)

    with pytest.raises(ParamError, match=r"^n=\.\.\.|^n:") as info:
        Loose(n=-1)
    assert "test.base" not in str(info.value)


def test_params_without_dataclass_are_refused_at_registration():
    with pytest.raises(TypeError, match="@dataclass"):
        @register_pass("test.base.bad")
        class Bad(Pass):
            class Params(PassParams):
                n: int = 1
