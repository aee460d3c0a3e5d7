"""Run ``lightning-fuse ARGS`` inside the test process, as a user would see it on the command line.

A subprocess pays a Python start and the torch/Lightning/transformers imports (seconds) per command; tests whose
point is an exit code, an ``error:`` line or what a command prints run the same :func:`lightning_fuse.cli.main`
here. Everything a process would have written to its stdout/stderr is captured: ``print``, log records (the root
logger and the libraries' own non-propagating loggers) and warnings. The process state the command changes
(environment, ``sys.argv``, working folder, warning filters, the root logger's level, transformers' progress bars) is
restored afterwards.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).parents[1]
# loggers that may not propagate to the root logger (each library's own stderr handler)
_OWN_HANDLER_LOGGERS = ("lightning.pytorch", "lightning.fabric", "transformers")
# Python's default warning filters (``python -W`` not given), first match wins
_FRESH_FILTERS = (("ignore", DeprecationWarning), ("ignore", PendingDeprecationWarning), ("ignore", ImportWarning),
                  ("ignore", ResourceWarning))


@dataclass
class Result:
    """What a finished command left: the same fields as :class:`subprocess.CompletedProcess` that tests read."""

    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """``lightning-fuse ARGS`` in this process (``exit_on_error=True``: one ``error:`` line and exit code 1, 2 for
    usage errors), run from the repository root with ``LIGHTNING_FUSE_VERBOSE`` unset."""
    from transformers.utils import logging as hf_logging

    from lightning_fuse.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    targets = [root, *(lg for name in _OWN_HANDLER_LOGGERS if not (lg := logging.getLogger(name)).propagate)]
    root_level, bars = root.level, hf_logging.is_progress_bar_enabled()

    def show(message, category, filename, lineno, file=None, line=None):
        err.write(warnings.formatwarning(message, category, filename, lineno, line))

    environ = {**os.environ, "LIGHTNING_FUSE_VERBOSE": "", **(env or {})}
    code = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, environ, clear=True))
        stack.enter_context(contextlib.chdir(ROOT))
        stack.enter_context(warnings.catch_warnings())
        warnings.resetwarnings()  # a fresh interpreter's filters (pytest's would record the warnings instead)
        for action, category in _FRESH_FILTERS:
            warnings.simplefilter(action, category, append=True)
        warnings.showwarning = show
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        for target in targets:
            target.addHandler(handler)
        root.setLevel(logging.INFO)  # `main`'s logging.basicConfig does nothing where pytest's handlers are set
        try:
            main(list(args), exit_on_error=True)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            for target in targets:
                target.removeHandler(handler)
            root.setLevel(root_level)
            if bars:
                hf_logging.enable_progress_bar()
    return Result(code, out.getvalue(), err.getvalue())
