"""Running a graph only as far as needed: an fx.Interpreter that stops as soon as it has seen what it
was run for (the calibration passes read a few layers' inputs and need not run the rest)."""

from __future__ import annotations

from typing import Any

import torch.fx as fx


class SeenAll(Exception):
    """Raised from ``run_node`` once every watched value has been seen: the rest of the graph need not run."""


class PartialInterpreter(fx.Interpreter):
    """An fx.Interpreter whose ``run_node`` may raise :class:`SeenAll` to stop; :meth:`run_until_seen` runs it."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        # On any exception out of a node, torch's interpreter formats the whole graph for its trace log
        # (print_readable: about 65 ms on MiniLM); stopping early once per batch and stage then cost
        # more than the runs themselves (int4 GPTQ on MiniLM: 107 s of 230).
        self.extra_traceback = False

    def run_until_seen(self, *args: Any, initial_env: dict[fx.Node, Any] | None = None) -> None:
        """Run the graph on ``args`` until ``run_node`` raises :class:`SeenAll` or the graph ends."""
        try:
            self.run(*args, initial_env=initial_env)
        except SeenAll:
            pass
