"""The two kinds of failure the CLI turns into one-line messages (exit 2 and exit 1)."""


class UserError(Exception):
    """Bad input: a flag, a file, a config value. Exit code 2. Carries a hint on how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class RunError(Exception):
    """The run itself failed (NaN loss, out of memory, disk full). Exit code 1."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): what a one-line error quotes of a library's
    multi-line message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def describe(e: BaseException) -> str:
    """`TypeName: first line of the message` (or the type name alone): an exception from code that is not ours,
    quoted in one line."""
    line = first_line(e)
    return f"{type(e).__name__}: {line}" if line else type(e).__name__
