"""tinylm's training and held-out text: Python's own documentation (``pydoc_data.topics``) and the
docstrings of the standard library's modules, read with ``ast`` (nothing is imported), as bytes.

Every twentieth document is held out, so the held-out split is English of the same kind the model
trained on but never saw. The documents depend on the Python version that runs this (tinylm's
weights were trained on the split of Python 3.11).
"""

from __future__ import annotations

import ast
import functools
import pathlib
import sysconfig

import torch

EOS = 256  # ends every document; byte ids are 0-255
VOCAB_SIZE = 257
HELD_OUT_EVERY = 20
# test suites and the IDE hold little prose; site-packages is not the standard library
_SKIPPED_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__"}


def _docstrings() -> list[str]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:  # one-line "Return x." strings teach little
                    found.append(doc)
    return found


@functools.lru_cache(maxsize=1)
def documents() -> tuple[str, ...]:
    """Every document in a fixed order: the pydoc topics, then the docstrings."""
    from pydoc_data.topics import topics

    return tuple([topics[key] for key in sorted(topics)] + _docstrings())


def encode(text: str) -> torch.Tensor:
    """Token ids of ``text``: its UTF-8 bytes."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: torch.Tensor | list[int]) -> str:
    """The text of token ids (the end-of-text id and invalid UTF-8 are dropped)."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return bytes(v for v in values if 0 <= v < 256).decode("utf-8", errors="ignore")


def _split(held_out: bool) -> list[str]:
    return [d for i, d in enumerate(documents()) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out]


def held_out_text() -> str:
    """The held-out documents joined by blank lines."""
    return "\n\n".join(_split(held_out=True))


def training_stream() -> torch.Tensor:
    """The training documents as one stream of ids, each document closed by ``EOS``."""
    parts = []
    for doc in _split(held_out=False):
        parts.append(encode(doc))
        parts.append(torch.tensor([EOS]))
    return torch.cat(parts)
