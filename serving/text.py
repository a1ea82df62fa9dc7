"""Stop strings: where a completion's text ends, and how much of a growing text is safe to stream.

A stop string ends the completion before it (it is not part of the returned text, as in OpenAI's API). While
streaming, the tail that could still become a stop string (or is half a UTF-8 character) is held back.
"""

from __future__ import annotations


def find_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """The index where the earliest stop string begins in ``text`` (searching from ``start``), or None.

    >>> find_stop("12 + 3 = 15\\nnext", ["\\n", "="])
    5
    >>> find_stop("abc", ["x"]) is None
    True
    """
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def safe_prefix_len(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be sent now: everything except a tail that is the beginning of a stop string,
    and an unfinished character (the replacement character a partial UTF-8 sequence decodes to).

    >>> safe_prefix_len("The answer is 4 ##", ["###"])
    16
    >>> safe_prefix_len("abc", [])
    3
    """
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end


class StopTracker:
    """One completion's text as it grows: what to stream next and whether a stop string has appeared.

    ``feed(text)`` takes the whole decoded text so far and returns the new part that is safe to send;
    ``finish(text)`` returns the rest (up to a stop string). ``stopped`` is set once a stop string is seen and
    ``text`` then holds the completion's final text. With ``min_tokens`` (vLLM's request extension), a stop string
    counts only once the completion has that many tokens (``n_tokens``) and only if it ends after the text those
    first tokens made, as vLLM checks only the text added after them.
    """

    def __init__(self, stops: list[str], min_tokens: int = 0):
        self.stops = stops
        self.min_tokens = min_tokens
        self.sent = 0
        self.stopped = False
        self.text = ""
        self._search_from = 0
        self._floor = 0  # a stop string must end after this many characters (the text of the first min_tokens)

    def check(self, text: str, n_tokens: int | None = None) -> bool:
        """Whether ``text`` contains a stop string (searching only the part that could hold a new one);
        ``n_tokens``: how many tokens made ``text`` (needed with ``min_tokens``)."""
        if not self.stops:
            return False
        if n_tokens is not None and n_tokens < self.min_tokens:
            self._floor = len(text)
            return False
        hits = [i for s in self.stops if (i := text.find(s, max(self._search_from, self._floor - len(s) + 1))) >= 0]
        cut = min(hits) if hits else None
        self._search_from = max(0, len(text) - max(len(s) for s in self.stops))
        if cut is not None:
            self.stopped, self.text = True, text[:cut]
        return cut is not None

    def feed(self, text: str, n_tokens: int | None = None) -> str:
        if self.stopped:
            return ""
        if self.check(text, n_tokens):
            return self.finish(text)
        end = safe_prefix_len(text, self.stops)
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def finish(self, text: str) -> str:
        if not self.stopped:
            self.check(text)
        final = self.text if self.stopped else text
        self.text = final
        delta = final[self.sent:]
        self.sent = len(final)
        return delta
