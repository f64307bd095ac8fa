"""Errors raised for bad user input: each names the file, tensor or field at fault."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


class LensError(Exception):
    """Base class of every error ComfyUI-Lens raises on purpose."""


class CheckpointError(LensError, ValueError):
    """A weight file is missing, truncated, corrupt, or holds another architecture.

    The message always starts with the offending path so users know which file to replace.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class ResolutionError(LensError, ValueError):
    """Width/height/aspect ratio that Lens cannot generate."""


class TokenizerError(LensError, ValueError):
    """No usable o200k_harmony tokenizer could be found or loaded."""


def run_command(prog: str, body: Callable[[], object]) -> int:
    """A console command's exit status: 0 when ``body`` returns, 2 with ``prog: error: ...`` on
    stderr (no traceback) when it raises a user-facing error (a LensError or ValueError)."""
    try:
        body()
    except (LensError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
