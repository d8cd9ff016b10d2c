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
import sys
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from selfie_lite.errors import RunError, UserError, describe

console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}


def esc(value) -> str:
    """str(value) made safe to embed in Rich markup: brackets are shown as typed."""
    return escape(str(value))


def print_error(e) -> None:
    """`error: <message>` and, when the error has one, `hint: <hint>`; the message and the hint are escaped."""
    err_console.print(f"[bold red]error:[/bold red] {esc(e)}" + (f"\n[dim]hint: {esc(e.hint)}[/dim]" if e.hint else ""),
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
                err_console.print(f"[bold red]error:[/bold red] {esc(describe(e))}", highlight=False,
                                  soft_wrap=True)
                err_console.print("[dim]run again with --debug for the full traceback[/dim]")
                raise typer.Exit(1) from None
            print_error(mapped)
            raise typer.Exit(mapped.exit_code) from None

    return wrapper


def _map_library_error(e: Exception):
    text = str(e)
    if type(e).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text:
        from selfie_lite.backends.hf import oom_error

        return oom_error(e, "this stage")
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
