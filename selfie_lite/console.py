"""Shared CLI plumbing: the two consoles and the decorator that turns errors into one line and an exit code.

Command modules (cli.py, and the eval/report/doctor commands) use these so every command fails the same way.
"""

from __future__ import annotations

import functools

import typer
from rich.console import Console

from selfie_lite.errors import RunError, UserError

console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}


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
            err_console.print(f"[bold red]error:[/bold red] {e}" + (f"\n[dim]hint: {e.hint}[/dim]" if e.hint else ""),
                              highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None
        except Exception as e:
            if STATE["debug"]:
                raise
            mapped = _map_library_error(e)
            if mapped is None:
                err_console.print(f"[bold red]error:[/bold red] {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                                  highlight=False, soft_wrap=True)
                err_console.print("[dim]run again with --debug for the full traceback[/dim]")
                raise typer.Exit(1) from None
            err_console.print(f"[bold red]error:[/bold red] {mapped}" + (f"\n[dim]hint: {mapped.hint}[/dim]" if mapped.hint else ""),
                              highlight=False, soft_wrap=True)
            raise typer.Exit(mapped.exit_code) from None

    return wrapper


def _map_library_error(e: Exception):
    text = str(e)
    if type(e).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text:
        from selfie_lite.backends.hf import oom_error

        return oom_error(e, "this stage")
    return None


