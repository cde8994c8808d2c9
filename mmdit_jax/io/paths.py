"""One path layer for local paths and object-store URLs (gs://, s3://).

Built on etils `epath` rather than on fsspec directly: Orbax reads and writes every checkpoint through
epath, so one backend, set up once, serves the checkpoints and every other file. Without TensorFlow,
epath hands gs:// and s3:// to fsspec (gcsfs, s3fs); both honour the usual credentials (Application
Default Credentials; the AWS chain) and endpoint variables (STORAGE_EMULATOR_HOST for GCS;
AWS_ENDPOINT_URL for S3), so an emulator or an S3-compatible store is reached without code here.

Local paths keep plain os calls (symlinks, modes, renames). For URLs:
- Libraries that read only local files (safetensors mmaps, tokenizers, Pillow, ArrayRecord readers) get a
  local copy (`local_file`, `local_folder`) kept under MMDIT_CACHE (default ~/.cache/mmdit-jax/remote);
  a file is fetched again only when the object changed (its generation / ETag, recorded per copy). Orbax checkpoints inside a folder are not copied:
  Orbax restores them from the bucket, each process reading its own shards.
- A link is a small JSON pointer file (NAME + LINK_SUFFIX: {"target": relative path or URL}), as
  buckets have no symlinks; `resolve` follows one.
- Storage failures (no such bucket, no credentials, access denied) become one MMDiTError line naming
  the URL (`storage_errors`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil

from mmdit_jax.errors import MMDiTError

SCHEMES = ("gs://", "s3://")
LINK_SUFFIX = ".link.json"
# a folder being written to a bucket holds this object until its last file is in (see files.atomic_folder)
WRITING_MARKER = ".partial"
CACHE_ENV = "MMDIT_CACHE"
STAMPS_DIR = ".stamps"  # under the cache: the object version each copy was made from
ENDPOINT_HELP = {"gs": "STORAGE_EMULATOR_HOST", "s3": "AWS_ENDPOINT_URL"}
# Orbax checkpoint folders hold one of these; such a folder is read in place, never copied
ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")
CHUNK = 16 << 20


def _bridge_endpoints() -> None:
    """Orbax stores arrays through TensorStore, whose own GCS client reads TENSORSTORE_GCS_HTTP_URL (its
    S3 client reads AWS_ENDPOINT_URL, as boto does): one endpoint variable then serves every library.
    Against an emulator, gcsfs's probe for hierarchical buckets (an API emulators lack) is turned off."""
    import fsspec.config

    # no cached listings: another process (the lead, a converter) adds objects this one must then see
    for scheme in ("gs", "gcs", "s3", "s3a"):
        fsspec.config.conf.setdefault(scheme, {}).setdefault("use_listings_cache", False)
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host if "://" in host else f"http://{host}")
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


_bridge_endpoints()


def is_remote(path) -> bool:
    return str(path).startswith(SCHEMES)


def _s(path) -> str:
    return path if isinstance(path, str) else (str(path) if is_remote(str(path)) else os.fspath(path))


def absolute(path) -> str:
    """A URL as it is; a local path made absolute."""
    path = _s(path)
    return path if is_remote(path) else os.path.abspath(path)


def join(path, *parts) -> str:
    path = _s(path)
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def dirname(path) -> str:
    path = _s(path).rstrip("/")
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def normpath(path) -> str:
    """`a/b/../c` folded (URLs keep their scheme and bucket)."""
    path = _s(path)
    if not is_remote(path):
        return os.path.normpath(path)
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{posixpath.normpath(rest)}"


def epath(path):
    from etils import epath as _epath

    return _epath.Path(_s(path))


def bucket_of(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


def _fs(url: str):
    """The fsspec filesystem epath uses for `url`."""
    from etils.epath import backend

    _bridge_endpoints()  # an endpoint variable set after import (tests, notebooks)
    return backend.fsspec_backend.fs(url)


@contextlib.contextmanager
def storage_errors(url):
    """Turns a storage library's failure on `url` into one MMDiTError line naming it: no such bucket,
    no credentials, access denied. A missing object stays FileNotFoundError (callers say what was
    missing)."""
    url = _s(url)
    if not is_remote(url):
        yield
        return
    try:
        yield
    except MMDiTError:
        raise
    except FileNotFoundError:
        problem = _bucket_problem(url)
        if problem:
            raise MMDiTError(f"{url}: {problem}") from None
        raise
    except Exception as e:  # noqa: BLE001 - every storage library has its own error types
        raise MMDiTError(f"{url}: {_describe(e)}") from None


def _describe(e: Exception) -> str:
    name = type(e).__name__
    text = " ".join(str(e).split())[:200]
    low = f"{name} {text}".lower()
    if "credential" in low or "defaultcredentialserror" in low or "unauthenticated" in low or \
            "401" in low or "invalidaccesskeyid" in low or "signaturedoesnotmatch" in low:
        return (f"no usable credentials ({name}: {text}); set up Application Default Credentials for "
                "gs:// or the AWS credential chain for s3://")
    if isinstance(e, PermissionError) or "forbidden" in low or "accessdenied" in low or "403" in low:
        return f"permission denied ({name}: {text})"
    return f"storage error ({name}: {text})"


def _bucket_problem(url: str) -> str | None:
    """Why `url`'s bucket cannot be used (None when it can be listed)."""
    try:
        _fs(url).ls(bucket_of(url) + "/", detail=False)
    except FileNotFoundError:
        return f"bucket {bucket_of(url)!r} does not exist (or these credentials cannot see it)"
    except Exception as e:  # noqa: BLE001 - every storage library has its own error types
        return _describe(e)
    return None


def check_bucket(url, what: str = "") -> None:
    """Fails with one line when `url`'s bucket is missing, or cannot be reached with these credentials."""
    url = _s(url)
    if not is_remote(url):
        return
    label = f"{what}: " if what else ""
    missing = _missing_credentials(url)
    if missing:
        raise MMDiTError(f"{label}{url}: no usable credentials ({missing})")
    try:
        with storage_errors(url):
            fs = _fs(url)
            fs.ls(bucket_of(url) + "/", detail=False)
    except FileNotFoundError:
        raise MMDiTError(f"{label}{url}: bucket {bucket_of(url)!r} does not exist (or these credentials "
                         "cannot see it)") from None
    except MMDiTError as e:
        raise MMDiTError(f"{label}{e}") from None


def _missing_credentials(url: str) -> str | None:
    """Why the credential chain for `url`'s store finds nothing (None when it finds some). Checked up
    front: without credentials the clients fall back to anonymous requests, whose refusal would read
    as a permission problem."""
    if url.startswith("s3://"):
        import botocore.session

        if botocore.session.get_session().get_credentials() is None:
            return ("the AWS chain found none: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or "
                    "an instance role")
        return None
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return None  # an emulator takes any request
    try:
        import google.auth

        google.auth.default()
    except Exception as e:  # noqa: BLE001 - DefaultCredentialsError and its transport failures
        return (f"no Application Default Credentials ({type(e).__name__}); run `gcloud auth "
                "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS")
    return None


def exists(path) -> bool:
    path = _s(path)
    if not is_remote(path):
        return os.path.lexists(path)
    with storage_errors(path):
        return epath(path).exists()


def isfile(path) -> bool:
    path = _s(path)
    if not is_remote(path):
        return os.path.isfile(path)
    with storage_errors(path):
        return epath(path).is_file()


def isdir(path) -> bool:
    path = _s(path)
    if not is_remote(path):
        return os.path.isdir(path)
    with storage_errors(path):
        return epath(path).is_dir()


def listdir(path) -> list[str]:
    path = _s(path)
    if not is_remote(path):
        return sorted(os.listdir(path))
    with storage_errors(path):
        return sorted(p.name for p in epath(path).iterdir())


def makedirs(path) -> None:
    """A folder (buckets have none: nothing to do there)."""
    path = _s(path)
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def open(path, mode: str = "r"):  # noqa: A001 - the builtin's signature, for any path
    path = _s(path)
    if not is_remote(path):
        import builtins

        return builtins.open(path, mode)
    with storage_errors(path):
        return epath(path).open(mode)


def read_text(path) -> str:
    with open(path, "r") as f:
        return f.read()


def read_json(path):
    return json.loads(read_text(path))


def remove(path) -> None:
    """A file (or, on a bucket, every object under the prefix); nothing there is not an error."""
    path = _s(path)
    if not is_remote(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        return
    with storage_errors(path):
        fs = _fs(path)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def files_under(path) -> dict[str, int]:
    """{relative path: size} of every file under a folder (links followed locally)."""
    return {rel: info[0] for rel, info in _listing(path).items()}


def _stamp(info: dict) -> str:
    """What changes when an object is rewritten (its generation / ETag / checksum), with its size."""
    for key in ("generation", "ETag", "etag", "md5Hash", "crc32c", "mtime", "LastModified"):
        if info.get(key):
            return f"{info.get('size')}:{info[key]}"
    return str(info.get("size"))


def _listing(path) -> dict[str, tuple[int, str]]:
    """{relative path: (size, stamp)} of every file under a folder."""
    path = _s(path)
    out = {}
    if not is_remote(path):
        for root, dirs, names in os.walk(path, followlinks=True):
            for name in names:
                full = os.path.join(root, name)
                st = os.stat(full)
                out[os.path.relpath(full, path)] = (st.st_size, f"{st.st_size}:{st.st_mtime_ns}")
        return out
    with storage_errors(path):
        fs = _fs(path)
        prefix = path.split("://", 1)[1].rstrip("/") + "/"
        for key, info in fs.find(path, detail=True).items():
            if info.get("type") == "directory" or not key.startswith(prefix):
                continue
            out[key[len(prefix):]] = (int(info.get("size") or 0), _stamp(info))
    return out


def upload(local: str, url: str) -> None:
    """One local file to one object (an object appears whole or not at all), checked by its size."""
    with storage_errors(url):
        with builtins_open(local, "rb") as src, epath(url).open("wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        size = _fs(url).size(url)
    if size != os.path.getsize(local):
        raise MMDiTError(f"{url}: upload incomplete ({size} of {os.path.getsize(local)} bytes)")


def download(url: str, local: str) -> None:
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.{os.getpid()}{WRITING_MARKER}"  # processes sharing a cache never share a temporary
    with storage_errors(url):
        with epath(url).open("rb") as src, builtins_open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    os.replace(tmp, local)


def builtins_open(path, mode):
    import builtins

    return builtins.open(path, mode)


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mmdit-jax", "remote")


def cache_path(url: str) -> str:
    """Where a URL's local copy lives: readable names, plus a short hash so two URLs never share one."""
    scheme, rest = url.split("://", 1)
    tag = hashlib.sha256(url.encode()).hexdigest()[:8]
    return os.path.join(cache_root(), scheme, rest.rstrip("/") + f"@{tag}")


def link_target(at) -> str | None:
    """Where the JSON link pointer at `at` points (absolute), or None when there is none."""
    at = _s(at)
    pointer = at + LINK_SUFFIX
    if not isfile(pointer):
        return None
    try:
        target = read_json(pointer)["target"]
    except (ValueError, KeyError, TypeError) as e:
        raise MMDiTError(f"{pointer}: not a link pointer ({type(e).__name__}: {e})") from None
    return target if is_remote(target) or os.path.isabs(target) else normpath(join(dirname(at), target))


def resolve(path) -> str:
    """`path`, or where its link pointer leads (followed through chains of them)."""
    path = _s(path)
    for _ in range(16):
        if exists(path):
            return path
        target = link_target(path)
        if target is None:
            return path
        path = target
    raise MMDiTError(f"{path}: too many link pointers in a row")


def local_file(path) -> str:
    """A local path holding `path`'s bytes: itself when local, else a cached copy."""
    path = resolve(_s(path))
    if not is_remote(path):
        return path
    local = cache_path(path)
    with storage_errors(path):
        if not isfile(path):
            raise MMDiTError(f"{path}: no such file")
        stamp = _stamp(_fs(path).info(path))
    _fetch(path, local, stamp)
    return local


def _fetch(url: str, local: str, stamp: str) -> None:
    """`url` to `local` unless the copy there was made of the same object version (its stamp file)."""
    # kept apart from the copies, so a copied folder holds only the object's files
    mark = os.path.join(cache_root(), STAMPS_DIR, hashlib.sha256(local.encode()).hexdigest()[:32])
    os.makedirs(os.path.dirname(mark), exist_ok=True)
    if os.path.isfile(local) and os.path.isfile(mark):
        with builtins_open(mark, "r") as f:
            if f.read() == stamp:
                return
    download(url, local)
    with builtins_open(mark, "w") as f:
        f.write(stamp)


def local_folder(path) -> str:
    """A local folder holding `path`'s files: itself when local, else a cached copy, refreshed where an
    object changed. Link pointers are followed (their targets copied in their place); Orbax
    checkpoint folders are not copied but linked by a pointer to their URL, as are checkpoint.json
    pointers rewritten to name theirs."""
    path = resolve(_s(path))
    if not is_remote(path):
        return path
    local = cache_path(path)
    _mirror(path.rstrip("/"), local, depth=0)
    return local


def _mirror(url: str, local: str, depth: int) -> None:
    if depth > 8:
        raise MMDiTError(f"{url}: link pointers nested too deep")
    if isfile(join(url, WRITING_MARKER)):
        raise MMDiTError(f"{url}: incomplete (its writer was stopped before it finished); write it again")
    files = _listing(url)
    if not files:
        raise MMDiTError(f"{url}: no such folder")
    os.makedirs(local, exist_ok=True)
    skip = set()
    for rel in sorted(files):  # Orbax folders: pointed at, not copied
        parts = rel.split("/")
        if parts[-1] in ORBAX_MARKERS and len(parts) > 1:
            skip.add("/".join(parts[:-1]))
    skip = {d for d in skip if not any(d.startswith(o + "/") for o in skip)}
    for d in sorted(skip):
        _write_link(os.path.join(local, d), join(url, d))
    for rel, (_, stamp) in sorted(files.items()):
        if any(rel.startswith(d + "/") for d in skip):
            continue
        src, dst = join(url, rel), os.path.join(local, rel)
        if rel.endswith(LINK_SUFFIX):
            target = link_target(src[:-len(LINK_SUFFIX)])
            at = dst[:-len(LINK_SUFFIX)]
            if isdir(target):
                _mirror(target.rstrip("/"), at, depth + 1)
            else:
                os.makedirs(os.path.dirname(at), exist_ok=True)
                shutil.copyfile(local_file(target), at)
            continue
        if os.path.basename(rel) == "checkpoint.json":
            # the Orbax pointer names its directory relative to the bucket folder: name it absolutely
            spec = read_json(src)
            if isinstance(spec, dict) and "directory" in spec and not is_remote(spec["directory"]):
                spec["directory"] = normpath(join(dirname(src), spec["directory"]))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with builtins_open(dst, "w") as f:
                json.dump(spec, f)
            continue
        _fetch(src, dst, stamp)


def _write_link(at: str, target: str) -> None:
    if os.path.isdir(at) and not os.path.islink(at):
        shutil.rmtree(at)
    os.makedirs(os.path.dirname(at), exist_ok=True)
    with builtins_open(at + LINK_SUFFIX, "w") as f:
        json.dump({"target": target}, f)


def local(path):
    """`path` itself when local (or None); a URL's local copy, as a folder or a file by what it is."""
    if path is None or not is_remote(path):
        return path
    path = resolve(_s(path))
    with storage_errors(path):
        is_dir = isdir(path)
    if not is_dir and not isfile(path):
        check_bucket(path)
        raise MMDiTError(f"{path}: no such file or folder")
    return local_folder(path) if is_dir else local_file(path)
