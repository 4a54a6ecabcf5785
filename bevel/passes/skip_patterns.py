"""The ``skip`` parameter the weight passes share: fnmatch patterns matched against stored weight
names, and the note for a pattern that matches nothing."""

from __future__ import annotations

import fnmatch

from bevel.ir.graph import Graph


def skipped(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a weight name matches one of the user's ``skip`` patterns (fnmatch)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def unmatched_skip_notes(patterns: tuple[str, ...], graph: Graph) -> list[str]:
    """A note for each ``skip`` pattern that matches none of the graph's stored tensor names (a module
    name given where a weight name is meant, or a typo): otherwise nothing would say the layer was not
    skipped."""
    names = sorted(graph.tensors())
    weights = [name for name in names if name.endswith("weight")] or names
    example = f", such as '{weights[0]}'" if weights else ""
    return [f"skip pattern '{pattern}' matches no weight (patterns are matched against weight names{example})"
            for pattern in patterns if not any(skipped(name, (pattern,)) for name in names)]
