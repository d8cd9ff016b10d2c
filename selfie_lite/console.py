"""Shared CLI plumbing: the two consoles, the decorator that turns errors into one line and an exit code, and
--json output.

Command modules (cli.py, and the eval/report/doctor commands) use these so every command fails the same way.
Anything a user typed (paths, values) or a library said reaches the screen through `esc` or a rich Text: Rich would
read `prefs[old].jsonl` or `[/bold]` as markup and show something else, or crash.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from selfie_lite.errors import RunError, UserError, describe


class LogConsole(Console):
    """A Console that, writing to a file or a pipe (a log, nohup, CI) with no COLUMNS set, is LOG_WIDTH wide instead
    of Rich's 80: tables lay out at their natural width and keep every header and figure ("pa…", "0.…" at 80).
    In a terminal, or with COLUMNS set, it is a plain Console."""

    LOG_WIDTH = 1000

    @property
    def size(self):
        dims = Console.size.fget(self)
        if self._width is None and not self.is_terminal and not self._environ.get("COLUMNS", "").isdigit():
            return dims._replace(width=self.LOG_WIDTH)
        return dims

    @size.setter
    def size(self, new_size):
        Console.size.fset(self, new_size)


console = LogConsole()
err_console = LogConsole(stderr=True)
STATE = {"debug": False, "flags": {}}  # flags: set by cli.py


def esc(value) -> str:
    """str(value) made safe to embed in Rich markup: brackets are shown as typed."""
    return escape(str(value))


def quiet_unless_main() -> None:
    """Several processes (`accelerate launch`, distributed.py): all but the main process print nothing but their
    errors (print_error names the process)."""
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        from selfie_lite import distributed

        if not distributed.is_main():
            console.quiet = err_console.quiet = True


def _rank_prefix() -> str:
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        return ""
    return f"[process {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']}] "


def print_error(e) -> None:
    """`error: <message>` and, when the error has one, `hint: <hint>`; the message and the hint are escaped. An error
    about one setting names it by its flag where the CLI has one (STATE["flags"]: key -> flag), else by its key."""
    if getattr(e, "quiet_on_peers", False):
        return  # distributed.MainStopped: the main process has printed the error
    key = getattr(e, "key", None)
    text = _rank_prefix() + (f"{STATE['flags'].get(key, key)} {e.message}" if key else str(e))
    err_console.quiet = False  # a process kept quiet (quiet_unless_main) still says why it stopped
    err_console.print(f"[bold red]error:[/bold red] {esc(text)}" + (f"\n[dim]hint: {esc(e.hint)}[/dim]" if e.hint else ""),
                      highlight=False, soft_wrap=True)


def friendly_errors(fn):
    """UserError -> exit 2, RunError -> exit 1, Ctrl-C -> exit 130; one line each, traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):  # typer.Exit is a RuntimeError: let it through untouched
            raise
        except (UserError, RunError) as e:
            if STATE["debug"]:
                raise
            print_error(e)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None
        except Exception as e:
            if STATE["debug"]:
                raise
            mapped = _map_library_error(e)
            if mapped is None:
                err_console.quiet = False
                err_console.print(f"[bold red]error:[/bold red] {esc(_rank_prefix() + describe(e))}", highlight=False,
                                  soft_wrap=True)
                err_console.print("[dim]run again with --debug for the full traceback[/dim]")
                raise typer.Exit(1) from None
            print_error(mapped)
            raise typer.Exit(mapped.exit_code) from None

    return wrapper


@contextmanager
def one_line_usage_errors(command: str = "selfie-lite"):
    """click's usage errors (a bad flag value, an unknown flag or command, a missing argument) as one `error:` line
    and a hint naming `command --help` (the error's own command where it carries one), exit 2, instead of Typer's
    boxed panel. A bare command that shows its help (no arguments) is left alone."""
    try:
        from typer._click import exceptions as click_errors  # typer vendors its own click since 0.2x
    except ImportError:
        from click import exceptions as click_errors

    try:
        yield
    except getattr(click_errors, "NoArgsIsHelpError", ()):
        raise
    except click_errors.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else command
        print_error(UserError(" ".join(e.format_message().split()), hint=f"see {where} --help"))
        raise typer.Exit(2) from None


def _map_library_error(e: Exception):
    text = str(e)
    if type(e).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text:
        from selfie_lite.backends.hf import oom_error

        return oom_error("this stage")
    if _rank_prefix() and (type(e).__name__ in ("DistBackendError", "DistNetworkError") or any(
            x in text for x in ("Connection reset by peer", "Connection closed by peer", "NCCL communicator was aborted"))):
        # Several processes (distributed.py): this one lost another, which died first and said why (or was killed).
        return RunError("another process of this run stopped, so this one stops too (the launcher's summary below "
                        "names it, and its own error line above says why)",
                        hint="finished stages are kept: resume with any number of processes")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return RunError(f"the disk is full{f' (writing {e.filename})' if e.filename else ''}",
                        hint="free some space or point --out at a larger disk, then add --resume")
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and e.filename:
        return RunError(f"cannot write {e.filename}: {e.strerror}", hint="check the folder's permissions")
    return None


# -- --json ------------------------------------------------------------------------------------------


@contextmanager
def json_output(on: bool):
    """--json: stdout carries exactly one JSON document (what `emit` is given); what is meant for people goes to
    stderr instead, so `selfie-lite ... --json | jq` works. Off: emit does nothing and nothing moves."""
    if not on:
        yield lambda obj: None
        return
    console.file = sys.stderr
    out = sys.stdout

    def emit(obj) -> None:
        out.write(json.dumps(obj, indent=2, default=str) + "\n")
        out.flush()

    try:
        yield emit
    finally:
        console.file = None  # back to whatever sys.stdout is
