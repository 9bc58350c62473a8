"""The file layer: everything swd_jax reads or writes goes through here, so a local path and `gs://` behave alike.

Paths are plain strings. A `gs://bucket/key` path is Cloud Storage (reached through etils `epath` / gcsfs, as
orbax reaches it; the emulator of the tests through `STORAGE_EMULATOR_HOST`); anything else is a local path,
made absolute. On Cloud Storage there are no folders and no rename: `makedirs` is a no-op, a write is one
object upload (atomic: readers see the old object or the new one), `move_tree` copies then deletes.

Writers that need a real local file (tensorboardX's event files, PIL, safetensors, array_record) write into a
`Staged` folder: the destination itself when it is local, else a local scratch folder whose new and changed
files `sync()` uploads. Readers that need a real local folder call `local_copy` (a cached download).
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile

GCS = "gs://"


def is_remote(path) -> bool:
    """Whether `path` is on Cloud Storage (`gs://...`)."""
    return os.fspath(path).startswith(GCS)


def resolve(path) -> str:
    """`gs://` paths as given (without a trailing slash); local ones absolute, `~` expanded."""
    path = os.fspath(path)
    if is_remote(path):
        if not path[len(GCS):].split("/", 1)[0]:
            raise ValueError(f"{path!r}: a gs:// path needs a bucket (gs://BUCKET/...)")
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def join(path, *parts: str) -> str:
    path = os.fspath(path)
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def parent(path) -> str:
    path = os.fspath(path).rstrip("/")
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def _fs():
    """The gcsfs file system epath uses (one instance per process), with its listing cache dropped: another
    host may have written since."""
    from etils.epath import backend
    fs = backend.fsspec_backend.fs(GCS)
    fs.invalidate_cache()
    return fs


def _key(path: str) -> str:
    return path[len(GCS):]


def exists(path) -> bool:
    path = os.fspath(path)
    return _fs().exists(_key(path)) if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
    path = os.fspath(path)
    return _fs().isdir(_key(path)) if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
    path = os.fspath(path)
    return _fs().isfile(_key(path)) if is_remote(path) else os.path.isfile(path)


def makedirs(path) -> None:
    """Create a local folder (and its parents); nothing on Cloud Storage, where folders are key prefixes.

    A local path that exists as a file is refused with one line (not `[Errno 17] File exists`).
    """
    path = os.fspath(path)
    if is_remote(path):
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is a file, not a folder")
    os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
    """Names directly under a folder (sorted); [] when there is none."""
    path = os.fspath(path)
    if not is_remote(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs = _fs()
    try:
        entries = fs.ls(_key(path), detail=False)
    except FileNotFoundError:
        return []
    return sorted({posixpath.basename(e.rstrip("/")) for e in entries} - {""})


def read_bytes(path) -> bytes:
    path = os.fspath(path)
    if is_remote(path):
        return _fs().cat_file(_key(path))
    with open(path, "rb") as f:
        return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path, data: bytes) -> None:
    """Write a whole file atomically: a local temporary file renamed over it, or one object upload."""
    path = os.fspath(path)
    if is_remote(path):
        _fs().pipe_file(_key(path), data)
        return
    makedirs(os.path.dirname(path) or ".")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def remove(path) -> None:
    """Delete a file if it exists."""
    path = os.fspath(path)
    if is_remote(path):
        fs = _fs()
        if fs.exists(_key(path)):
            fs.rm_file(_key(path))
    elif os.path.lexists(path):
        os.remove(path)


def remove_tree(path) -> None:
    path = os.fspath(path)
    if is_remote(path):
        fs = _fs()
        if fs.exists(_key(path)):
            fs.rm(_key(path), recursive=True)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def copy_tree(src, dst) -> int:
    """Copy every file under folder `src` to folder `dst` (any mix of local and gs://); returns the count."""
    src, dst = os.fspath(src), os.fspath(dst)
    n = 0
    for rel in _files_under(src):
        copy_file(join(src, *rel.split("/")), join(dst, *rel.split("/")))
        n += 1
    return n


def copy_file(src, dst) -> None:
    src, dst = os.fspath(src), os.fspath(dst)
    if not is_remote(src) and not is_remote(dst):
        makedirs(os.path.dirname(dst))
        shutil.copyfile(src, dst)
    elif is_remote(src) and not is_remote(dst):
        makedirs(os.path.dirname(dst))
        _fs().get_file(_key(src), dst)
    elif not is_remote(src):
        _fs().put_file(src, _key(dst))
    else:
        _fs().copy(_key(src), _key(dst))


def move_tree(src, dst) -> None:
    """Move folder `src` to `dst` (a rename locally; copy then delete on Cloud Storage). `dst` must not exist."""
    src, dst = os.fspath(src), os.fspath(dst)
    if not is_remote(src) and not is_remote(dst):
        os.replace(src, dst)
        return
    copy_tree(src, dst)
    remove_tree(src)


def _files_under(folder: str) -> list[str]:
    """Relative '/'-separated paths of every file under `folder`."""
    if not is_remote(folder):
        out = []
        for root, _, files in os.walk(folder):
            for f in files:
                out.append(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"))
        return sorted(out)
    fs, key = _fs(), _key(folder).rstrip("/")
    return sorted(p[len(key) + 1:] for p in fs.find(key) if p.startswith(key + "/"))


def local_copy(path, *, what: str = "folder") -> str:
    """A local folder holding the files of `path`: `path` itself when local; else a download into
    `$SWD_GCS_CACHE` (default ~/.cache/swd_jax/gcs/BUCKET/KEY), refreshed when an object's size or
    checksum changed."""
    path = os.fspath(path)
    if not is_remote(path):
        return path
    if not exists(path):
        raise FileNotFoundError(f"{what} {path} not found")
    root = os.environ.get("SWD_GCS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "swd_jax", "gcs")
    local = os.path.join(root, _key(resolve(path)))
    fs, key = _fs(), _key(resolve(path))
    if fs.isfile(key):  # a single file
        os.makedirs(os.path.dirname(local), exist_ok=True)
        _fetch_if_changed(fs, key, local)
        return local
    for rel in _files_under(path):
        _fetch_if_changed(fs, f"{key}/{rel}", os.path.join(local, *rel.split("/")))
    return local


def _fetch_if_changed(fs, key: str, local: str) -> None:
    info = fs.info(key)
    stamp = f"{info.get('size')}:{info.get('md5Hash') or info.get('crc32c') or info.get('generation')}"
    marker = local + ".swd_source"
    if os.path.exists(local) and os.path.exists(marker) and open(marker).read() == stamp:
        return
    os.makedirs(os.path.dirname(local), exist_ok=True)
    fs.get_file(key, local + ".part")
    os.replace(local + ".part", local)
    with open(marker, "w") as f:
        f.write(stamp)


class Staged:
    """A local folder standing for `destination`: writers write into `.path`, `sync()` uploads what changed.

    For a local destination `.path` is the destination itself and `sync()` does nothing.
    """

    def __init__(self, destination):
        self.destination = resolve(destination)
        self.remote = is_remote(self.destination)
        if self.remote:
            tag = hashlib.sha1(self.destination.encode()).hexdigest()[:10]
            self.path = tempfile.mkdtemp(prefix=f"swd_staged_{tag}_")
        else:
            makedirs(self.destination)
            self.path = self.destination
        self._sent: dict[str, tuple[int, int]] = {}

    def fetch(self, rel: str) -> bool:
        """Bring destination/rel into the staging folder (to append to it); whether it existed."""
        if not self.remote:
            return os.path.exists(os.path.join(self.path, rel))
        src = join(self.destination, rel)
        if not exists(src):
            return False
        local = os.path.join(self.path, rel)
        copy_file(src, local)
        st = os.stat(local)
        self._sent[rel] = (st.st_size, st.st_mtime_ns)
        return True

    def sync(self) -> int:
        """Upload the files that are new or changed since the last sync; returns how many."""
        if not self.remote:
            return 0
        n = 0
        for rel in _files_under(self.path):
            local = os.path.join(self.path, *rel.split("/"))
            try:
                st = os.stat(local)
            except FileNotFoundError:
                continue
            stamp = (st.st_size, st.st_mtime_ns)
            if self._sent.get(rel) != stamp:
                copy_file(local, join(self.destination, rel))
                self._sent[rel] = stamp
                n += 1
        return n

    def close(self) -> None:
        self.sync()
        if self.remote:
            shutil.rmtree(self.path, ignore_errors=True)
