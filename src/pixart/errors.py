"""The one exception type that means "the user gave us something we cannot use"."""


class PixArtError(Exception):
    """A user-facing error: its message is one line that says what was wrong and what would work.

    The CLI prints it as ``error: <message>`` and exits non-zero, without a traceback. Anything
    else that escapes is a bug in pixart and keeps its traceback.
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), to quote inside a PixArtError."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
