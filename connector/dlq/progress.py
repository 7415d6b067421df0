"""A redrive's progress on a terminal: a ``tqdm`` bar on stderr (a library, not hand-drawn
ANSI: it handles terminal width, rates and ETA), or nothing when stderr is not a
terminal, so logs and scripts only get the final summary."""

from __future__ import annotations

import sys
from typing import Never

from tqdm import tqdm


class Progress:
    """Offsets of the dead-letter topic read so far against those to read (transaction
    markers take offsets too), and how many dead letters were copied."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: tqdm[Never] | None = None
        self._copied = 0

    def start(self, total: int | None) -> None:
        if self.enabled and self._bar is None:
            self._bar = tqdm(
                total=total,
                unit=" offsets",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.5,
                desc="redrive",
            )

    def advance(self, offsets: int, *, copied: bool) -> None:
        if self._bar is None:
            return
        self._copied += copied
        self._bar.update(offsets)
        if copied:
            self._bar.set_postfix_str(f"copied {self._copied}", refresh=False)

    def close(self, *, finished: bool = False) -> None:
        """``finished``: every offset was read (the markers after the last record too)."""
        if self._bar is not None:
            if finished and self._bar.total is not None:
                self._bar.update(self._bar.total - self._bar.n)
            self._bar.close()
            self._bar = None
