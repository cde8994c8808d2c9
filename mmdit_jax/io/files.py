"""Outputs that appear whole or not at all, readable as the user's other files are, and movable.

Every file or folder the package writes for a user goes through here: it is built under `PATH.partial`
and renamed into place. The temporary is created as any new file is (open / mkdir, so the umask, and a
default ACL where there is one, decide its mode), never with mkstemp / mkdtemp, whose private 0600 / 0700
would survive the rename. One writer per output path: a `.partial` left by a killed run is replaced.
Links inside a folder point relatively at what the folder itself holds, so it can be moved or copied.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil

PARTIAL = ".partial"


def _clear(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


class AtomicFile:
    """`f` writes to PATH.partial; `commit` renames it to PATH, `abort` removes it."""

    def __init__(self, path, mode: str = "wb"):
        if "w" not in mode:
            raise ValueError(f"AtomicFile writes a new file: mode {mode!r} has no 'w'")
        self.path = os.path.abspath(os.fspath(path))
        self.tmp = self.path + PARTIAL
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        _clear(self.tmp)
        self.f = open(self.tmp, mode.replace("w", "x"))  # a new file: mode 0o666 less the umask

    def commit(self) -> str:
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.f.close()
        if os.path.lexists(self.tmp):
            os.remove(self.tmp)


@contextlib.contextmanager
def atomic_file(path, mode: str = "wb"):
    """`with atomic_file(path, "w") as f:` the file appears at `path` when the block ends without error."""
    w = AtomicFile(path, mode)
    try:
        yield w.f
    except BaseException:
        w.abort()
        raise
    w.commit()


def write_json(path, obj, **dump_kw) -> None:
    """`obj` as JSON (indent 2 unless told), atomically."""
    dump_kw.setdefault("indent", 2)
    with atomic_file(path, "w") as f:
        json.dump(obj, f, **dump_kw)
        f.write("\n")


class AtomicFolder:
    """A folder built at `tmp` (PATH.partial); `commit` puts it at PATH (swapping out a folder already
    there: callers decide whether replacing one is allowed), `abort` removes it."""

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        self.tmp = self.path + PARTIAL
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        _clear(self.tmp)
        os.mkdir(self.tmp)  # mode 0o777 less the umask

    def commit(self) -> str:
        if os.path.lexists(self.path):
            old = self.path + ".old"
            _clear(old)
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            _clear(old)
        else:
            os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path):
    """`with atomic_folder(path) as tmp:` write into `tmp`; it becomes `path` when the block ends without
    error (and is removed if it raises)."""
    w = AtomicFolder(path)
    try:
        yield w.tmp
    except BaseException:
        w.abort()
        raise
    w.commit()


def copy_tree(src, dst) -> None:
    """`src`'s files (links followed) into `dst` as new files: the modes are the umask's, not the source's
    (shutil.copytree would carry a private source folder's 0700 over)."""
    src, dst = os.fspath(src), os.fspath(dst)
    for root, dirs, names in os.walk(src, followlinks=True):
        dirs.sort()
        out = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(out, exist_ok=True)
        for name in sorted(names):
            shutil.copyfile(os.path.join(root, name), os.path.join(out, name))


def link(target, at, root) -> None:
    """A symlink at `at` to `target`: relative when `target` lies inside `root` (the folder `at` belongs
    to), so a moved or copied `root` still finds it; absolute otherwise, so moving `root` keeps it. An
    existing link at `at` is re-pointed; anything else there is left as it is."""
    target, at, root = (os.path.abspath(os.fspath(p)) for p in (target, at, root))
    inside = os.path.commonpath([target, root]) == root
    dest = os.path.relpath(target, os.path.dirname(at)) if inside else target
    if os.path.islink(at):
        if os.readlink(at) == dest:
            return
        tmp = at + PARTIAL
        _clear(tmp)
        os.symlink(dest, tmp)
        os.replace(tmp, at)
    elif not os.path.lexists(at):
        os.symlink(dest, at)
