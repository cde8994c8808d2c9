"""Outputs that appear whole or not at all, readable as the user's other files are, and movable.

Every file or folder the package writes for a user goes through here: it is built under `PATH.partial`
and renamed into place. The temporary is created as any new file is (open / mkdir, so the umask, and a
default ACL where there is one, decide its mode), never with mkstemp / mkdtemp, whose private 0600 / 0700
would survive the rename. One writer per output path: a `.partial` left by a killed run is replaced.
Links inside a folder point relatively at what the folder itself holds, so it can be moved or copied.

On a bucket (gs://, s3://, see io.paths) there is no rename, but one object appears whole or not at all:
a file is built locally and uploaded as one object, then checked by its size; a folder is built locally
and uploaded under a WRITING_MARKER object, its top-level files last, the marker removed at the end, so
a reader that finds the folder's top-level files (model_index.json, config.json) finds everything, and
one that finds the marker knows the writer died. A link is a JSON pointer file (paths.LINK_SUFFIX).
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile

from mmdit_jax.io import paths

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
        self.path = paths.absolute(path)
        self.url = None
        if paths.is_remote(self.path):  # built locally, uploaded by commit
            self.url, self.path = self.path, os.path.join(tempfile.mkdtemp(prefix="mmdit-upload-"), "file")
        self.tmp = self.path + PARTIAL
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        _clear(self.tmp)
        self.f = open(self.tmp, mode.replace("w", "x"))  # a new file: mode 0o666 less the umask

    def commit(self) -> str:
        self.f.close()
        os.replace(self.tmp, self.path)
        if self.url is None:
            return self.path
        try:
            paths.upload(self.path, self.url)
        finally:
            shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)
        return self.url

    def abort(self) -> None:
        self.f.close()
        if os.path.lexists(self.tmp):
            os.remove(self.tmp)
        if self.url is not None:
            shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)


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
        self.path = paths.absolute(path)
        if paths.is_remote(self.path):
            self.tmp = tempfile.mkdtemp(prefix="mmdit-upload-")
            return
        self.tmp = self.path + PARTIAL
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        _clear(self.tmp)
        os.mkdir(self.tmp)  # mode 0o777 less the umask

    def commit(self) -> str:
        if paths.is_remote(self.path):
            try:
                upload_folder(self.tmp, self.path)
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)
            return self.path
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


def upload_folder(local: str, url: str) -> None:
    """A local folder's files to `url`, replacing what was there, under the writing marker (see above)."""
    marker = paths.join(url, paths.WRITING_MARKER)
    with atomic_file(marker, "w") as f:
        f.write("being written\n")
    for name in paths.listdir(url):
        if name != paths.WRITING_MARKER:
            paths.remove(paths.join(url, name))
    files = sorted(paths.files_under(local), key=lambda rel: ("/" not in rel, rel))  # top level last
    for rel in files:
        paths.upload(os.path.join(local, rel), paths.join(url, *rel.split(os.sep)))
    paths.remove(marker)


def copy_tree(src, dst) -> None:
    """`src`'s files (links followed) into `dst` as new files: the modes are the umask's, not the source's
    (shutil.copytree would carry a private source folder's 0700 over). Either side may be a URL."""
    if paths.is_remote(src) or paths.is_remote(dst):
        src = paths.local_folder(src)
        if paths.is_remote(dst):
            for rel in sorted(paths.files_under(src)):
                paths.upload(os.path.join(src, rel), paths.join(dst, *rel.split(os.sep)))
            return
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
    existing link at `at` is re-pointed; anything else there is left as it is. On a bucket the link is a
    JSON pointer file at `at` + paths.LINK_SUFFIX, with the same relative-or-absolute rule."""
    if paths.is_remote(at) or paths.is_remote(target):
        target, at, root = (paths.absolute(p) for p in (target, at, root))
        inside = paths.is_remote(target) and target.startswith(root.rstrip("/") + "/")
        dest = posixpath.relpath(target.split("://", 1)[1], paths.dirname(at).split("://", 1)[1]) \
            if inside else target
        if paths.isfile(at + paths.LINK_SUFFIX) or not paths.exists(at):
            write_json(at + paths.LINK_SUFFIX, {"target": dest})
        return
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
