"""One line for every error the ``lightning-fuse`` command ends with: ``error: <cause>. <fix>``.

The library raises errors whose message already names the problem and the fix; this module finds that error
behind the wrappers it may come in (jsonargparse's "Does not validate against any of the Union subtypes" with a
``Namespace`` dump, Lightning's re-raises, torch's ``RuntimeError: [enforce fail at inline_container.cc]`` around an
``OSError``) and turns common operating-system errors (disk full, read-only folder, no permission) into a line that
says what to do. :func:`error_line` is used by :func:`lightning_fuse.cli.main`, the one place that prints errors.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

PACKAGE_DIR = str(Path(__file__).resolve().parent)
VERBOSE_ENV = "LIGHTNING_FUSE_VERBOSE"
_WHERE = "--trainer.default_root_dir and the logger's save_dir (or precompute's --cache_dir, export's --out)"
_OS_FIXES = {
    errno.ENOSPC: ("no space left on the device", f"Free space there, or point {_WHERE} to a disk with room; "
                   "a fit resumes from its last complete checkpoint with --ckpt_path last"),
    errno.EDQUOT: ("disk quota exceeded", f"Free space within your quota, or point {_WHERE} to another disk"),
    errno.EROFS: ("read-only file system", f"Point {_WHERE} to a writable folder"),
    errno.EACCES: ("permission denied", f"Fix the folder's permissions, or point {_WHERE} to a folder you can write"),
    errno.EPERM: ("operation not permitted", f"Fix the folder's permissions, or point {_WHERE} to a folder you can "
                  "write"),
}
_UNION = "Does not validate against any of the Union subtypes"


def verbose_requested(env: dict[str, str] | None = None) -> bool:
    """Whether ``LIGHTNING_FUSE_VERBOSE`` asks for tracebacks (any value but empty, 0, false, no)."""
    value = (os.environ if env is None else env).get(VERBOSE_ENV, "")
    return value.strip().lower() not in ("", "0", "false", "no")


def chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and every exception behind it (``__cause__``, else ``__context__``), outermost first."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _from_library(err: BaseException) -> bool:
    """Raised by lightning-fuse's own code (its innermost frame is in the package), or one of its error classes."""
    if type(err).__module__.startswith("lightning_fuse"):
        return True
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return last is not None and os.path.abspath(last.tb_frame.f_code.co_filename).startswith(PACKAGE_DIR)


_BUG_TYPES = (AttributeError, NameError, AssertionError, ZeroDivisionError, IndexError, KeyError)


def _message(err: BaseException) -> str | None:
    """The message of an error the library raised on purpose (a sentence), None for what looks like a bug."""
    if isinstance(err, _BUG_TYPES):
        first = err.args[0] if err.args else None
        return first.strip() if isinstance(first, str) and " " in first.strip() else None
    return str(err).strip() or None


def _os_line(err: OSError) -> str | None:
    if err.errno not in _OS_FIXES:
        return None
    what, fix = _OS_FIXES[err.errno]
    where = f" writing {err.filename}" if err.filename else ""
    return f"{what}{where} ([Errno {err.errno}] {err.strerror or os.strerror(err.errno)}). {fix}."


def _union_problems(message: str) -> str | None:
    """The real problems inside jsonargparse's union error (its ``Errors:`` list, without the ``None`` branch)."""
    if _UNION not in message:
        return None
    block = message.split("Errors:", 1)[-1].split("Given value type:", 1)[0]
    items = [m.strip() for m in re.split(r"\n\s*- ", "\n" + block) if m.strip()]
    items = [m for m in items if not m.startswith("Expected a <class 'NoneType'>")]
    return "\n".join(items) if items else None


def condense_usage_error(message: str) -> str:
    """jsonargparse's message for a bad option without its union-of-subtypes scaffolding and value dump."""
    if _UNION not in message:
        return message
    head = message.split(_UNION, 1)[0].strip().rstrip(":")
    block = message.split("Errors:", 1)[-1].split("Given value type:", 1)[0]
    lines = [line.strip() for line in block.splitlines()]
    keep = [line.removeprefix("- ") for line in lines
            if line and not line.startswith(("- Expected a <class 'NoneType'>", "- Problem with given class_path"))]
    return ": ".join([head, " ".join(keep)]) if keep else message


def _first_lines(text: str, limit: int = 6) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[:limit]) + (f"\n... ({len(lines) - limit} more lines)" if len(lines) > limit else "")


def error_line(err: BaseException) -> str:
    """What ``lightning-fuse`` prints for ``err`` (without the ``error: `` prefix): one line per problem."""
    errors = list(chain(err))
    for e in errors:  # an OS error anywhere in the chain is the cause (torch wraps it in RuntimeError)
        if isinstance(e, OSError) and (line := _os_line(e)):
            return line
    for e in errors:
        if isinstance(e, RuntimeError) and "inline_container.cc" in str(e) and "write" in str(e).lower():
            return (f"writing a file failed ({_first_lines(str(e), 1)}): usually a full disk. "
                    f"{_OS_FIXES[errno.ENOSPC][1]}.")
    for e in errors:  # the outermost error the library raised names the problem and the fix
        if _from_library(e) and (text := _message(e)):
            return _first_lines(_union_problems(text) or text)
    for e in errors:
        if (problems := _union_problems(str(e))) is not None:
            return _first_lines(problems)
    root = errors[-1]
    text = _first_lines(str(root), 1) or "no details"
    return (f"{type(root).__name__}: {text}. Unexpected: rerun with --verbose (or {VERBOSE_ENV}=1) for the "
            "traceback, and report it if the input looks right.")
