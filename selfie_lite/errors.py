"""The two kinds of failure the CLI turns into one-line messages (exit 2 and exit 1)."""


class UserError(Exception):
    """Bad input: a setting, a file, an argument. Exit code 2. Carries a hint on how to fix it and, where one setting
    is at fault, its key ("beta", "data.labelled_share", an api.evaluate option): the message then reads
    "<key> <message>", and the CLI puts the flag's name where the key is (cli.FLAGS)."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, key: str | None = None):
        super().__init__(f"{key} {message}" if key else message)
        self.message, self.hint, self.key = message, hint, key


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
