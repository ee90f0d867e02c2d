"""stdout whose reader exits after the first line, as `| head -1` does: the first line (a
print and its flush) is taken, every write after it raises BrokenPipeError."""

from __future__ import annotations


class ReaderGone:
    def __init__(self) -> None:
        self.out: list[str] = []  # what was written before the reader went
        self.flushed = False
        self.refused = 0  # writes after it: how far the command went on

    def write(self, text: str) -> int:
        if self.flushed:
            self.refused += 1
            raise BrokenPipeError(32, "Broken pipe")
        self.out.append(text)
        return len(text)

    def flush(self) -> None:
        self.flushed = True
