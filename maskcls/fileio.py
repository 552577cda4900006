"""The toolkit's one way to write a file and to replace an output folder.

- `atomic_write(path, write)`: a crash, a full disk or Ctrl-C half-way never leaves a half-written
  file under the final name, and the previous file stays intact. The new file gets the
  permissions a plain `open(path, "w")` would give it (0o666 less the umask for a new file, the
  old file's mode for a replaced one), so teammates on a shared disk can read it.
- `check_apart(out, inputs)`: refuse an output folder that equals, contains or lies inside the data
  a tool reads, before anything is written.
- `replace_folder(out, build, marker=..., tool=...)`: build a folder beside `out` and swap it in;
  an existing `out` is replaced only when it carries the tool's marker file (or is empty), so a
  folder the tool did not make is never deleted.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterable

from maskcls.cli import ToolkitError

PathLike = str | os.PathLike


def _relabel(exc: OSError, path: Path) -> OSError:
    """The same error naming the user's path instead of our temp file."""
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; best effort (not every filesystem lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> None:
    """Call write(tmp) to fill a temp file beside `path`, fsync it, then rename it over `path`.

    On any exception (including KeyboardInterrupt) the temp file is removed and the previous
    `path`, if any, is left as it was. OSErrors about the temp file are re-raised naming `path`.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    try:
        mode = os.stat(path).st_mode & 0o7777  # an existing file keeps its mode, as open() would
    except OSError:
        mode = None
    while True:
        tmp = _temp_name(path)
        try:
            # created with 0o666 so the kernel applies the umask, exactly as for open(path, "w")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise _relabel(e, path) from None
        os.close(fd)
        break
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points at it
        finally:
            os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _relabel(e, path) from None
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:  # e.g. a full disk mid-write
            raise _relabel(e, path) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see atomic_write)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically (see atomic_write)."""
    atomic_write_bytes(path, text.encode(encoding))


# --------------------------------------------------------------------------- folders
def check_apart(out: PathLike, inputs: Iterable[PathLike], flag: str = "--out") -> None:
    """Raise ToolkitError when `out` equals, contains or lies inside one of `inputs` (symlinks
    resolved): replacing such a folder would delete or corrupt the data being read."""
    out = Path(out)
    target = out.resolve()
    for source in inputs:
        real = Path(source).resolve()
        if target == real:
            relation = "is"
        elif target in real.parents:
            relation = "contains"
        elif real in target.parents:
            relation = "lies inside"
        else:
            continue
        raise ToolkitError(f"{flag} {out} {relation} the data it reads ({source}); "
                           f"choose a folder outside the data")


_DRIVE = re.compile(r"^[A-Za-z]:")  # C:\\x or C:x: a Windows drive, whatever the host


def path_escape(text: str) -> str | None:
    """Why a relative path read from a file (an ImageID, a listed image) would leave the folder it is
    read against, or None when it stays inside: an absolute path, a drive letter, a UNC name, or a `..`
    segment (either slash). Judged on the text alone, before anything is opened, so a link the folder's
    owner put inside the folder stays theirs to use."""
    if not text:
        return "an empty path"
    if text.startswith(("/", "\\")) or os.path.isabs(text):
        return "an absolute path"
    if _DRIVE.match(text):
        return "a drive letter"
    if ".." in re.split(r"[\\/]+", text):
        return "a '..' segment"
    return None


def within(root: PathLike, path: PathLike) -> bool:
    """Whether `path` (as a run's val_samples.csv records its images) lies inside `root`, judged on the
    normalised text (both made absolute from the same folder): `..` cannot climb out, and links inside
    `root` are the owner's to use."""
    root_text, path_text = os.path.normpath(os.path.abspath(root)), os.path.normpath(os.path.abspath(path))
    return path_text == root_text or path_text.startswith(root_text.rstrip(os.sep) + os.sep)


def _make_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder; made with os.mkdir so the umask applies as for any folder
    (tempfile.mkdtemp would make it 0700, unreadable for teammates once renamed into place)."""
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(folder, 0o777)
            return folder
        except FileExistsError:
            continue


def is_marked(folder: PathLike, marker: str) -> bool:
    """True when `folder` carries the marker file a tool leaves in the folders it makes."""
    return (Path(folder) / marker).is_file()


def replace_folder(out: PathLike, build: Callable[[Path], None], *, marker: str, tool: str,
                   flag: str = "--out") -> Path:
    """Fill a new folder with build(tmp) beside `out`, mark it, then put it in place of `out`.

    An existing `out` must be a folder that carries `marker` (made by this tool before) or is
    empty; anything else raises ToolkitError and nothing is touched. A failure while building
    leaves `out` as it was.
    """
    out = Path(out)
    exists = out.exists() or out.is_symlink()
    if exists:
        if not out.is_dir():
            raise ToolkitError(f"{flag} exists and is not a folder: {out}")
        if not is_marked(out, marker) and any(out.iterdir()):
            raise ToolkitError(f"{flag} {out} exists and was not made by {tool} (it has no {marker}); "
                               f"choose a new folder, or empty or remove it yourself")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _relabel(e, out.parent) from None
    tmp = _make_dir(out.parent, f".{out.name}.partial-")
    trash = None
    try:
        build(tmp)
        atomic_write_text(tmp / marker, f"Made by {tool}. {tool} replaces this folder when it is its {flag} again.\n")
        if exists:
            trash = _make_dir(out.parent, f".{out.name}.old-")
            os.replace(out, trash / "old")  # out of the way first: never two half-trees under one name
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(trash / "old", out)
                raise
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None and not os.path.lexists(trash / "old"):  # never delete the old folder itself here
            shutil.rmtree(trash, ignore_errors=True)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)  # rmtree removes symlinks, never their targets
    return out


def free_run_dir(model_dir: str, name: str) -> Path:
    """<model_dir>/<name>, or <name>2, <name>3, ... if taken (never overwrite a run)."""
    base = Path(model_dir) / name
    path, n = base, 2
    while path.exists():
        path, n = base.with_name(f"{name}{n}"), n + 1
    return path


def unique_dir(model_dir: str, name: str) -> Path:
    """Create and return the first free run folder (see free_run_dir)."""
    while True:
        path = free_run_dir(model_dir, name)
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:  # another run took it meanwhile
            continue
