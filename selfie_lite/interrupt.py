"""Stopping between two finished items: a Ctrl-C that Python swallowed, and fault injection for the resume tests
(SELFIE_LITE_KILL_AT="<stage>:<items>")."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

_interrupted = False


@contextmanager
def ctrl_c_noted():
    """Ctrl-C raises KeyboardInterrupt at once, as usual, and is also noted, so that safe_point (called after every
    finished item of every stage) raises it again. Python drops a KeyboardInterrupt that lands in a weakref callback
    or a __del__ (e.g. inside a lazy import: "Exception ignored in ... _get_module_lock"); without the note the run
    would carry on to the end as if nothing was pressed."""
    global _interrupted

    def handler(signum, frame):
        global _interrupted
        _interrupted = True
        raise KeyboardInterrupt

    def unraisable(args):
        # Python prints "Exception ignored in ... Traceback ... KeyboardInterrupt" when Ctrl-C lands in a __del__ or a
        # weakref callback (seen inside the regex package's clean-up). The press is noted above and stops the run at
        # the next item: the user should see our one line, not a traceback.
        if issubclass(args.exc_type, KeyboardInterrupt):
            global _interrupted
            _interrupted = True
            return
        previous_hook(args)

    # Keep SIGINT ignored where the parent ignored it (a shell's background job); signal() only works in the main thread.
    install = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    try:
        old = signal.signal(signal.SIGINT, handler) if install else None
    except ValueError:
        old = None
    previous_hook = sys.unraisablehook
    sys.unraisablehook = unraisable
    _interrupted = False
    try:
        yield
    finally:
        _interrupted = False
        sys.unraisablehook = previous_hook
        if old is not None:
            signal.signal(signal.SIGINT, old)


# -- fault injection (tests and the curious): SELFIE_LITE_KILL_AT="<stage>:<items>" ------------------


def safe_point(stage: str, items_done: int) -> None:
    """A point between two finished items of `stage` (a sampling chunk, a scoring pass, an optimizer step), where
    stopping loses nothing: a Ctrl-C that Python swallowed (see ctrl_c_noted) stops the run here, and with
    SELFIE_LITE_KILL_AT=stage:n the process kills itself (SIGKILL, no clean-up) once n items are done, which the
    resume tests use to prove that a kill at any point loses no work and changes no result; stage:n@r kills only the
    process of rank r of several (tests/test_distributed.py)."""
    if _interrupted:
        raise KeyboardInterrupt
    spec = os.environ.get("SELFIE_LITE_KILL_AT", "")
    if not spec:
        return
    spec, _, only_rank = spec.partition("@")  # stage:n@r: only the process of rank r (accelerate launch) dies
    if only_rank and os.environ.get("RANK", "0") != only_rank:
        return
    name, _, n = spec.partition(":")
    if name == stage and items_done >= int(n or 0):
        os.kill(os.getpid(), signal.SIGKILL)
