"""The compile report: per-pass time, size, FLOPs, sparsity and fidelity; a table, markdown or JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bevel.compiler.fidelity import Fidelity


@dataclass
class GraphFigures:
    """Size and cost of a graph at one point of the pipeline."""

    params: int
    bytes: int
    flops: int
    sparsity: float  # fraction of zeros over layer weights (Linear, Conv, matmul by a weight matrix)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict of these figures."""
        return {"params": self.params, "bytes": self.bytes, "flops": self.flops,
                "sparsity": round(self.sparsity, 6)}


@dataclass
class PassReport:
    """What one pass did. ``status`` is "applied", "no change", "rolled back" or "failed"."""

    name: str
    status: str
    seconds: float
    before: GraphFigures
    after: GraphFigures
    fidelity: Fidelity | None = None
    check_seconds: float = 0.0  # lint and fidelity check after the pass, not counted in ``seconds``
    reason: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    quality: dict[str, float] = field(default_factory=dict)  # after the pass: perplexity, validation fidelity

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict of this entry."""
        return {"name": self.name, "status": self.status, "seconds": round(self.seconds, 4),
                "check_seconds": round(self.check_seconds, 4),
                "before": self.before.to_json(), "after": self.after.to_json(),
                "fidelity": self.fidelity.to_json() if self.fidelity else None,
                "reason": self.reason, "stats": self.stats, "notes": self.notes, "quality": self.quality}


@dataclass
class Report:
    """Everything a compile measured: the original graph, then one entry per pass."""

    model: str
    pipeline: str
    original: GraphFigures
    capture_seconds: float
    calibration_batches: int
    passes: list[PassReport] = field(default_factory=list)
    max_fidelity_drop: float | None = None
    capture_fidelity: Fidelity | None = None  # the captured graph against the eager model, before any pass
    quality: dict[str, float] = field(default_factory=dict)  # the same before the passes

    @property
    def final(self) -> GraphFigures:
        """Figures of the graph after the last pass."""
        return self.passes[-1].after if self.passes else self.original

    @property
    def fidelity(self) -> Fidelity | None:
        """Fidelity of the final graph: that of the last pass that kept its rewrite."""
        for entry in reversed(self.passes):
            if entry.status in ("applied", "no change") and entry.fidelity is not None:
                return entry.fidelity
        return None

    def __getitem__(self, name: str) -> PassReport:
        """The entry of the first pass whose name (without parameters) is ``name``."""
        for entry in self.passes:
            if entry.name == name or entry.name.split("(")[0] == name:
                return entry
        raise KeyError(f"no pass named '{name}' in this report (passes: {[p.name for p in self.passes]})")

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict of every figure."""
        return {"model": self.model, "pipeline": self.pipeline, "original": self.original.to_json(),
                "capture_seconds": round(self.capture_seconds, 4),
                "calibration_batches": self.calibration_batches, "max_fidelity_drop": self.max_fidelity_drop,
                "capture_fidelity": self.capture_fidelity.to_json() if self.capture_fidelity else None,
                "quality": self.quality, "passes": [p.to_json() for p in self.passes]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Report":
        """Rebuild a report written by :meth:`to_json` (used when an artifact is loaded)."""
        def figures(d: dict[str, Any]) -> GraphFigures:
            return GraphFigures(d["params"], d["bytes"], d["flops"], d["sparsity"])

        def fidelity(d: dict[str, Any] | None) -> Fidelity | None:
            return Fidelity(**d) if d else None

        passes = [PassReport(name=p["name"], status=p["status"], seconds=p["seconds"],
                             before=figures(p["before"]), after=figures(p["after"]), fidelity=fidelity(p["fidelity"]),
                             check_seconds=p.get("check_seconds", 0.0), reason=p["reason"], stats=p["stats"],
                             notes=p["notes"], quality=p.get("quality", {})) for p in data["passes"]]
        return cls(model=data["model"], pipeline=data["pipeline"], original=figures(data["original"]),
                   capture_seconds=data["capture_seconds"], calibration_batches=data["calibration_batches"],
                   passes=passes, max_fidelity_drop=data.get("max_fidelity_drop"),
                   capture_fidelity=fidelity(data.get("capture_fidelity")), quality=data.get("quality", {}))

    def rows(self) -> list[list[str]]:
        """The table's rows as text: the original graph first, then each pass."""
        rows = [["(captured)", "", f"{self.capture_seconds:.2f}", "", _count(self.original.params),
                 _mb(self.original.bytes), _gflops(self.original.flops), f"{self.original.sparsity:.1%}",
                 *_fidelity_cells(self.capture_fidelity)]]
        for p in self.passes:
            rows.append([p.name, p.status, f"{p.seconds:.2f}", f"{p.check_seconds:.2f}", _count(p.after.params),
                         _mb(p.after.bytes), _gflops(p.after.flops), f"{p.after.sparsity:.1%}",
                         *_fidelity_cells(p.fidelity)])
        return rows

    HEADERS = ["pass", "status", "time s", "check s", "params", "MB", "GFLOPs", "zeros", "cosine", "max abs err",
               "top-1"]

    def __str__(self) -> str:
        from io import StringIO

        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"bevel report: {self.model}", caption=self._caption())
        for header in self.HEADERS:
            table.add_column(header, justify="left" if header in ("pass", "status") else "right")
        for row in self.rows():
            table.add_row(*row)
        buffer = StringIO()
        Console(file=buffer, width=140, force_terminal=False, color_system=None).print(table)
        return buffer.getvalue().rstrip() + self._reasons()

    def to_markdown(self) -> str:
        """The same table as GitHub markdown, with the notes under it."""
        lines = [f"# bevel report: {self.model}", "", f"Pipeline: `{self.pipeline}`", "",
                 "| " + " | ".join(self.HEADERS) + " |", "|" + "---|" * len(self.HEADERS)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        lines += ["", self._caption(), self._reasons()]
        return "\n".join(lines).rstrip() + "\n"

    def _caption(self) -> str:
        budget = "none" if self.max_fidelity_drop is None else f"{self.max_fidelity_drop}"
        return (f"fidelity on {self.calibration_batches} calibration batch(es) against the original model; "
                f"time = the pass itself, check = lint and fidelity check after it; zeros = share of layer "
                f"weights equal to 0; fidelity budget (max drop in cosine): {budget}")

    def _reasons(self) -> str:
        lines = []
        if self.quality:
            lines.append(f"\n- held-out quality: before the passes {_quality(self.quality)}")
            lines += [f"; after {p.name} {_quality(p.quality)}" for p in self.passes if p.quality]
        lines += [f"\n- {p.name}: {p.status}: {p.reason}" for p in self.passes if p.reason]
        lines += [f"\n- {p.name}: {note}" for p in self.passes for note in p.notes]
        for p in self.passes:
            per_output = p.fidelity.per_output if p.fidelity else {}
            if len(per_output) > 1 and max(per_output.values()) - min(per_output.values()) > 0.01:
                figures = ", ".join(f"{path} {value:.4f}" for path, value in per_output.items())
                lines.append(f"\n- {p.name}: cosine by output: {figures}")
            if p.fidelity and p.fidelity.not_compared:
                lines.append(f"\n- {p.name}: not compared (their shape changed on purpose): "
                             f"{', '.join(p.fidelity.not_compared)}")
        return "".join(lines)

    def save_json(self, path: str) -> None:
        """Write :meth:`to_json` to ``path``."""
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)


def _fidelity_cells(fid: Fidelity | None) -> list[str]:
    if fid is None:
        return ["", "", ""]
    top1 = f"{fid.top1_agreement:.1%}" if fid.top1_agreement is not None else ""
    return [f"{fid.cosine:.5f}", f"{fid.max_abs_error:.2e}", top1]


def _quality(figures: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in figures.items())


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _gflops(n: int) -> str:
    return f"{n / 1e9:.3f}"
