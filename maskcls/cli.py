"""The one command-line wrapper every script ends with, and the checks its flags share.

    if __name__ == "__main__":
        cli.run(main)

`run` turns what a user can cause into one line and an exit code, and leaves tracebacks for bugs:
- `ToolkitError` (bad data, bad flags, a bad checkpoint ...): `error: <message>`, exit 2;
- an OSError on a path the user gave (a file where a folder is expected, no permission, a full
  disk): `error: <strerror>: <path>`, exit 2;
- Ctrl-C or SIGTERM (to the process or to its whole group, as `scancel`, `timeout` and
  `kill -- -PGID` send it): quiet, exit 128 + the signal number (130, 143);
- a closed stdout (`| head`): quiet.
Python warnings print as one line each, `warning: <message>`, without the source line.

Only the standard library is imported: every module may import this one cheaply.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import errno
import math
import os
import re
import signal
import sys
import threading
import warnings
from typing import Callable, Iterable, Iterator, NoReturn, Sequence

EXIT_USAGE = 2  # argparse's code for a bad command line; the toolkit uses it for any bad input
EXIT_BROKEN_PIPE = 1  # as Python's documentation recommends for a closed stdout

# errno values that are about the machine rather than a bug, even when the OSError names no file
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EMFILE,
                       errno.ENFILE, errno.ENOMEM}


class ToolkitError(Exception):
    """Base of every error a user can cause; str() is one line saying what is wrong and with what."""


class UsageError(ToolkitError, ValueError, argparse.ArgumentTypeError):
    """A bad flag value. Also an ArgumentTypeError, so a validator raising it from an argparse
    `type=` function reads `argument --lr: must be > 0, got -1` rather than `invalid value`."""


class Interrupted(KeyboardInterrupt):
    """Stopped by a termination signal; `signum` gives the exit code 128 + signum."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = int(signum)


def exit_code(exc: BaseException) -> int:
    """128 + the signal number of an interrupt (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


# --------------------------------------------------------------------------- running a main
def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    stream = sys.stderr if file is None else file
    try:
        stream.write(f"warning: {str(message).strip()}\n")
        stream.flush()
    except (OSError, ValueError):  # a closed stderr must not turn a warning into a crash
        pass


@contextlib.contextmanager
def handling_signals() -> Iterator[None]:
    """SIGTERM raises Interrupted(SIGTERM) in the main thread while inside; warnings print as one
    line. The previous handler and warning settings come back afterwards, so in-process callers
    (tests) are left as they were. Outside the main thread only the warnings part applies."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if in_main else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            yield
    finally:
        if in_main:
            # None: the previous handler was not set from Python; the default is the best guess
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def os_error_line(exc: OSError) -> str | None:
    """`<strerror>: <path>` for an OSError a user's path or machine caused, None for anything else."""
    if isinstance(exc, BrokenPipeError):
        return None
    if exc.errno is None and _from_worker(str(exc)):  # re-raised by a DataLoader: the message only
        exc = _worker_os_error(exc)
    what = exc.strerror or str(exc)
    if exc.filename is not None:
        where = os.fsdecode(exc.filename) if isinstance(exc.filename, (str, bytes, os.PathLike)) else str(exc.filename)
        if isinstance(exc, FileExistsError) and os.path.isfile(where):  # mkdir met a file where a folder belongs
            what = "a file is in the way of a folder"
        if exc.filename2 is not None:
            where += f" -> {os.fsdecode(exc.filename2)}"
        return f"{what}: {where}"
    if exc.errno in _ENVIRONMENT_ERRNOS:
        return what
    return None


def _worker_os_error(exc: OSError) -> OSError:
    """The OSError a DataLoader worker raised, rebuilt from its last traceback line
    ("FileNotFoundError: [Errno 2] No such file or directory: '<path>'", or "'<a>' -> '<b>'" for a
    rename); `exc` when that line has no errno."""
    found = re.search(rf"\[Errno (\d+)\] (.*?)(?:: ({_QUOTED})(?: -> ({_QUOTED}))?)?$", worker_message(str(exc)))
    if found is None:
        return exc
    number, strerror, *names = found.groups()
    # the paths as Python's repr wrote them: '...' or, when the path holds a ', "..."
    names = [ast.literal_eval(name) for name in names if name is not None]
    return type(exc)(int(number), strerror, *names[:1], *([None, names[1]] if len(names) == 2 else []))


_QUOTED = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""  # a Python str repr


def error(message: object) -> None:
    """Print `error: <message>` on stderr (one line)."""
    print(f"error: {worker_message(str(message))}", file=sys.stderr, flush=True)


def _from_worker(text: str) -> bool:
    """Whether an error's text is a DataLoader worker's traceback, re-raised in the main process."""
    return "\nOriginal Traceback" in text


def worker_message(text: str) -> str:
    """A DataLoader re-raises a worker's error with the worker's whole traceback as its message
    ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): keep the error's own line."""
    if not _from_worker(text):
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    kind, sep, message = last.partition(": ")
    return message if sep and " " not in kind else last


def _quiet_stdout() -> None:
    # After EPIPE, Python's own flush at exit would print "Exception ignored ... BrokenPipeError".
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def call(main: Callable[[], int | None]) -> int:
    """Run main() as `run` does and return the exit code instead of exiting (for tests)."""
    try:
        with handling_signals():
            code = main()
            sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not at exit
        return int(code or 0)
    except ToolkitError as e:
        error(e)
        return EXIT_USAGE
    except KeyboardInterrupt as e:  # Ctrl-C or a SIGTERM: the script already said what it saved
        return exit_code(e)
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as e:
        line = os_error_line(e)
        if line is None:
            raise  # not about the user's paths: a bug, keep the traceback
        error(line)
        return EXIT_USAGE


def run(main: Callable[[], int | None]) -> NoReturn:
    """The `if __name__ == "__main__":` tail of every script: exit with main()'s code, see the module doc."""
    sys.exit(call(main))


# --------------------------------------------------------------------------- validating flags
def examples(items: Sequence[object], k: int = 3, sep: str = ", ") -> str:
    """At most k items, then "and N more": long lists stay one readable line."""
    shown = sep.join(str(s) for s in items[:k])
    return shown + (f"{sep}and {len(items) - k} more" if len(items) > k else "")


def suggest(value: str, known: Iterable[str]) -> str | None:
    """The known name a typo most likely meant: same letters in another case, else the closest
    spelling (difflib), else a name the value starts with or that starts with it; None if none."""
    names = list(known)
    lowered = {n.lower(): n for n in names}
    v = value.lower()
    if v in lowered:
        return lowered[v]
    close = difflib.get_close_matches(v, list(lowered), n=1, cutoff=0.6)
    if close:
        return lowered[close[0]]
    prefix = [n for low, n in lowered.items() if len(low) >= 3 and (v.startswith(low) or low.startswith(v))]
    return prefix[0] if len(v) >= 3 and prefix else None


def choose(value: str, known: Iterable[str], flag: str) -> str:
    """`value` if it is one of `known`; otherwise UsageError naming the known ones and, for a
    near miss, the one meant: unknown --criterion 'focal_loss'; known: ... (did you mean 'focal'?)."""
    names = list(known)
    if value in names:
        return value
    hint = suggest(value, names)
    raise UsageError(f"unknown {flag} {value!r}; known: {', '.join(names)}"
                     + (f" (did you mean {hint!r}?)" if hint else ""))


def _number(value: object, flag: str | None) -> int | float:
    if isinstance(value, bool):
        raise _bad(flag, f"must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        number = value
    else:
        text = str(value).strip()
        try:
            number = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise _bad(flag, f"must be a number, got {value!r}") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise _bad(flag, f"must be a finite number, got {value!r}")
    return number


def _bad(flag: str | None, what: str) -> UsageError:
    # no flag: called as an argparse type=, which puts "argument --x: " in front itself
    return UsageError(f"{flag} {what}" if flag else what)


def positive(value: object, flag: str | None = None) -> int | float:
    """value > 0 (a number or its text), else UsageError `--lr must be > 0, got -1`."""
    number = _number(value, flag)
    if not number > 0:
        raise _bad(flag, f"must be > 0, got {value}")
    return number


def non_negative(value: object, flag: str | None = None) -> int | float:
    """value >= 0, else UsageError `--warmup must be >= 0, got -1`."""
    number = _number(value, flag)
    if not number >= 0:
        raise _bad(flag, f"must be >= 0, got {value}")
    return number


def positive_int(value: object, flag: str | None = None) -> int:
    """A whole number >= 1 (epochs, batch sizes), else UsageError `--epochs must be an integer >= 1, got 0`."""
    number = _number(value, flag)
    if not isinstance(number, int) or number < 1:
        raise _bad(flag, f"must be an integer >= 1, got {value}")
    return number


def non_negative_int(value: object, flag: str | None = None) -> int:
    """A whole number >= 0 (worker counts), else UsageError `--num_workers must be an integer >= 0, got -1`."""
    number = _number(value, flag)
    if not isinstance(number, int) or number < 0:
        raise _bad(flag, f"must be an integer >= 0, got {value}")
    return number


def str2bool(value: str | bool) -> bool:
    """True/False (also 1/0, yes/no, y/n, on/off, any case), else UsageError: a typo such as `Ture`
    must not quietly read as False."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes", "y", "on"):
        return True
    if value.lower() in ("false", "0", "no", "n", "off"):
        return False
    raise UsageError(f"expected True or False, got {value!r}")


def optional_bool(value: str | bool | None) -> bool | None:
    """str2bool, or None for `auto` / `none`: the default that depends on the device."""
    if value is None or isinstance(value, bool):
        return value
    return None if value.lower() in ("auto", "none") else str2bool(value)


def in_range(value: object, low: float, high: float, flag: str | None = None, *,
             low_open: bool = False, high_open: bool = False) -> int | float:
    """low <= value <= high (`low_open` / `high_open` exclude the end), else UsageError
    `--val_ratio must be in [0, 1), got 1.5`."""
    number = _number(value, flag)
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise _bad(flag, f"must be in {interval}, got {value}")
    return number


def ranged(low: float, high: float, *, low_open: bool = False, high_open: bool = False,
           kind: type = float) -> Callable[[str], int | float]:
    """An argparse `type=` for in_range: `p.add_argument("--val_ratio", type=cli.ranged(0, 1, high_open=True))`."""
    def check(text: str) -> int | float:
        number = in_range(text, low, high, low_open=low_open, high_open=high_open)
        if kind is int and not isinstance(number, int):
            raise _bad(None, f"must be an integer, got {text}")
        return kind(number)
    check.__name__ = f"{kind.__name__} in range"
    return check


class DataError(ToolkitError, ValueError):
    """Bad input data; the message is one line and names the offending path."""


def fold_value(value: str | int) -> int | str:
    """argparse type of --fold: a fold number, or `all`."""
    if isinstance(value, int) or value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"expected a fold number or all, got {value!r}") from None
