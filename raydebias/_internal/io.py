"""Atomic writes, fsspec/pyarrow filesystem resolution and content fingerprints.

Run-directory paths are :class:`pathlib.Path` on local disk and :class:`upath.UPath` on an object store or other
fsspec filesystem (``s3://``, ``gs://``; :func:`as_path`), so stage code joins and reads them the same way. A write
to a local path goes to a temp file beside it and is renamed into place. An object store has no rename, but one
PUT is atomic (readers see the old object or the new one), so a file is written in one upload; a folder (a set of
Parquet parts, a checkpoint) is uploaded object by object and committed by the record that names it: the manifest
entry of its stage (``pipeline.Manifest``) or a checkpoint's pointer object.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

AnyPath = Union[Path, Any]  # a local Path or a UPath

# Ray workers write a run directory's objects while the driver reads it: no process may answer from a listing it
# cached earlier (fsspec's DirCache), or it misses what another wrote
for _protocol in ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def as_path(path: str | os.PathLike) -> AnyPath:
    """``path`` as a :class:`~pathlib.Path` when it is on local disk, else as a :class:`upath.UPath`
    (``s3://bucket/run``): the type stage code joins, lists and reads run-directory paths with."""
    if is_remote(path):
        from upath import UPath

        return path if isinstance(path, UPath) else UPath(str(path))
    if hasattr(path, "protocol"):  # a local UPath (file://)
        return Path(path.path)
    return Path(str(path).removeprefix("file://"))


def is_remote(path: str | os.PathLike) -> bool:
    """True for a path on a filesystem other than local disk (a URI with a scheme other than ``file``)."""
    protocol = getattr(path, "protocol", None)
    if protocol is not None:
        return protocol not in ("", "file", "local")
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def file_stamp(path: str | os.PathLike) -> str:
    """Changes when the file, or a file of the folder, is rewritten: mtimes and sizes on local disk, ETags (else
    modification times) remotely. A key for per-process caches of loaded files."""
    if is_remote(path):
        fs, p = url_to_fs(str(path))
        listing = fs.find(p, detail=True) if fs.isdir(p) else {p: fs.info(p)}
        return sha256_json(sorted((k, str(v.get("ETag") or v.get("LastModified")), v.get("size"))
                                  for k, v in listing.items()))
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return sha256_json([(str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files])


def read_bytes(path: str | os.PathLike) -> bytes:
    return as_path(path).read_bytes()


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict:
    """``safetensors.torch.load_file`` for a local or remote file (remote: read whole, then parsed in memory)."""
    from safetensors.torch import load, load_file

    if is_remote(path):
        out = load(read_bytes(path))
        return {k: v.to(device) for k, v in out.items()} if device != "cpu" else out
    return load_file(str(path), device=device)


def _tmp_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over it (remote: one upload)."""
    if is_remote(path):
        path = as_path(path)
        path.write_bytes(data)
        return path
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (file or directory); it replaces ``path`` only if the block succeeds.
    For a remote ``path`` the temp path is on local disk and is uploaded when the block succeeds."""
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="raydebias-upload-") as d:
            tmp = Path(d) / as_path(path).name
            yield tmp
            upload(tmp, path)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif tmp.is_dir() and (path.exists() or path.is_symlink()):  # a folder replaces a file
            path.unlink()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def remove_path(path: str | Path) -> None:
    """Remove a file, link or folder if it exists."""
    if is_remote(path):
        fs, p = url_to_fs(str(path))
        fs.invalidate_cache(p)
        if fs.exists(p):
            fs.rm(p, recursive=True)
        return
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def replace_path(src: str | Path, dst: str | Path) -> None:
    """Move ``src`` (a file or a complete folder) to ``dst``, replacing what is there. On one filesystem the move
    is a rename: readers see the old or the new whole, never a partly written one. Remote: the old ``dst`` is
    removed, then ``src`` (local or on the same store) is moved there; the stage's manifest entry commits it."""
    if is_remote(dst):
        if not is_remote(src):
            upload(src, dst)  # replaces dst
            remove_path(src)
            return
        remove_path(dst)
        fs, s = url_to_fs(str(src))
        d = url_to_fs(str(dst))[1]
        fs.invalidate_cache()  # the objects the workers wrote since this process last listed
        files = fs.find(s)
        for f in files:  # server-side copies, then the sources are removed
            fs.copy(f, d + f[len(s):])
        if files:
            fs.rm(files)
        return
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = dst.with_name(f".{dst.name}.old")
    remove_path(old)
    if dst.exists() or dst.is_symlink():
        os.replace(dst, old)
    os.replace(src, dst)
    remove_path(old)


def upload(src: str | Path, dst: str | os.PathLike) -> None:
    """Copy the local file or folder ``src`` to the remote ``dst``, replacing what is there."""
    fs, d = url_to_fs(str(dst))
    if fs.exists(d):
        fs.rm(d, recursive=True)
    if Path(src).is_dir():
        files = sorted(f for f in Path(src).rglob("*") if f.is_file())
        if files:
            fs.put([str(f) for f in files], [f"{d}/{f.relative_to(src).as_posix()}" for f in files])
    else:
        fs.put_file(str(src), d)


def download(src: str | os.PathLike, dst: str | Path) -> Path:
    """Copy the remote file or folder ``src`` to the local ``dst``."""
    fs, s = url_to_fs(str(src))
    dst = Path(dst)
    if fs.isdir(s):
        dst.mkdir(parents=True, exist_ok=True)
        for f in fs.find(s):
            out = dst / f[len(s):].lstrip("/")
            out.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(out))
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(s, str(dst))
    return dst


def local_copy(path: str | os.PathLike) -> str:
    """A local path holding ``path``'s file or folder, for readers that take only local paths (diffusers'
    ``from_pretrained``, peft adapters): ``path`` itself on local disk; a remote one is downloaded once per
    content into ``<tmp>/raydebias-remote/`` (keyed by the listing's names, sizes and ETags)."""
    if not is_remote(path):
        return str(path)
    key = sha256_json([str(path), file_stamp(path)])
    dst = Path(tempfile.gettempdir()) / "raydebias-remote" / key[:24] / as_path(path).name
    if not dst.exists():
        with atomic_path(dst) as tmp:
            download(path, tmp)
    return str(dst)


def atomic_write_table(path: str | Path, table: pa.Table) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return as_path(path)


def save_weights(path: str | Path, state: Any, metadata: dict[str, str] | None = None) -> Path:
    """Write a module's ``state_dict()`` (or a dict of tensors) as safetensors, atomically. Tensors are detached,
    moved to CPU and made contiguous: safetensors refuses strided views, and a channels_last conv weight is one
    (``models/classifier.py``), so no caller has to remember that."""
    from safetensors.torch import save_file

    if hasattr(state, "state_dict"):
        state = state.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return as_path(path)


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, p = fsspec.core.url_to_fs(uri)
    return fs, p


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def is_in_process(fs: fsspec.AbstractFileSystem) -> bool:
    """``memory://`` lives in one process: Ray workers cannot see it, so it is read in the driver."""
    return "memory" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    if is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def write_table_uri(table: pa.Table, uri: str) -> str:
    """Write one Parquet file to any fsspec URI, atomically: a rename on local disk; on an object store the upload
    is committed when the file is closed (readers see no object until then)."""
    fs, p = url_to_fs(uri)
    if is_local(fs):
        atomic_write_table(p, table)
    else:
        with fs.open(p, "wb") as f:
            pq.write_table(table, f)
    return uri


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_uri(uri: str, content_limit: int = 2 << 30) -> str:
    """Content hash of a file or directory tree on any fsspec URI.

    Hashes the bytes of every file while the total stays under ``content_limit``; above it (huge remote
    datasets) falls back to the listing's (path, size, ETag/mtime), which object stores change on rewrite.
    """
    fs, root = url_to_fs(uri)
    files = sorted(fs.find(root, detail=True).items()) if fs.isdir(root) else [(root, fs.info(root))]
    total = sum(int(info.get("size") or 0) for _, info in files)
    h = hashlib.sha256()
    def field(data: bytes) -> None:  # length-prefixed, so that name/content boundaries cannot collide
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    for name, info in files:
        field(os.path.relpath(name, root).encode() if name != root else b".")
        if total <= content_limit:
            inner = hashlib.sha256()
            with fs.open(name, "rb") as f:
                while block := f.read(1 << 20):
                    inner.update(block)
            field(inner.digest())
        else:
            meta = {k: str(info.get(k)) for k in ("size", "ETag", "etag", "mtime", "LastModified", "md5")}
            field(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def local_weights_fingerprint(path: str | None) -> str | None:
    """:func:`fingerprint_uri` of pretrained weights on local disk (a stage key then changes when the weights
    do, not only when the path string does); ``None`` for no path or a hub id / tag."""
    local = os.path.expanduser(path) if path else None
    return fingerprint_uri(local) if local and os.path.exists(local) else None


def link_parts(parts: list[Path], dst: Path) -> None:
    """Commit ``parts`` as the folder ``dst`` (``part-<i>.parquet`` in the given order): hard links where the
    filesystem has them, copies where it does not (server-side copies on an object store); ``dst`` is replaced
    whole."""
    if is_remote(dst):
        fs, d = url_to_fs(str(dst))
        remove_path(dst)
        for i, p in enumerate(parts):
            fs.copy(url_to_fs(str(p))[1], f"{d}/part-{i:06d}.parquet")
        return
    with atomic_path(dst) as tmp:
        tmp.mkdir()
        for i, p in enumerate(parts):
            try:
                os.link(p, tmp / f"part-{i:06d}.parquet")
            except OSError:
                shutil.copyfile(p, tmp / f"part-{i:06d}.parquet")
