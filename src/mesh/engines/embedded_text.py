"""Token bytes to text for the embedded engine: whole UTF-8 characters, cut at stop strings.

A token may end in the middle of a multi-byte character, and the text so far may be
the start of a stop string; both are held back until the next token decides them.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Feed each token's bytes to :meth:`feed`; emit what it returns, then :meth:`flush`.

    Once a stop string appears, :attr:`stop_sequence` is set and the text before it has
    been returned; nothing after it ever is.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stops if s)
        self._pending = ""  # decoded text that might begin a stop string
        self.stop_sequence: str | None = None

    def feed(self, data: bytes) -> str:
        if self.stop_sequence is not None:
            return ""
        return self._scan(self._decoder.decode(data))

    def flush(self) -> str:
        """What is left at the end of generation: held-back text and incomplete bytes."""
        if self.stop_sequence is not None:
            return ""
        text = self._scan(self._decoder.decode(b"", final=True))
        if self.stop_sequence is None:
            text, self._pending = text + self._pending, ""
        return text

    def _scan(self, text: str) -> str:
        if not self._stops:
            return text
        pending = self._pending + text
        found: tuple[int, str] | None = None
        for stop in self._stops:
            at = pending.find(stop)
            if at >= 0 and (found is None or at < found[0]):
                found = (at, stop)
        if found is not None:
            self.stop_sequence = found[1]
            self._pending = ""
            return pending[: found[0]]
        hold = max(_overlap(pending, stop) for stop in self._stops)
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold]


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``stop``."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
