"""Atomic writes, fsspec/pyarrow filesystem resolution and content fingerprints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def _tmp_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over it."""
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
    """Yield a temp path beside ``path`` (file or directory); it replaces ``path`` only if the block succeeds."""
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
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def replace_path(src: str | Path, dst: str | Path) -> None:
    """Move ``src`` (a file or a complete folder) to ``dst``, replacing what is there. On one filesystem the move
    is a rename: readers see the old or the new whole, never a partly written one."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = dst.with_name(f".{dst.name}.old")
    remove_path(old)
    if dst.exists() or dst.is_symlink():
        os.replace(dst, old)
    os.replace(src, dst)
    remove_path(old)


def atomic_write_table(path: str | Path, table: pa.Table) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


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
    return Path(path)


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
    """Write one Parquet file to any fsspec URI (atomically for local paths)."""
    fs, p = url_to_fs(uri)
    if is_local(fs):
        atomic_write_table(p, table)
    else:
        tmp = p + ".tmp"
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        fs.mv(tmp, p)
    return uri


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
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
    filesystem has them, copies where it does not; ``dst`` is replaced whole."""
    with atomic_path(dst) as tmp:
        tmp.mkdir()
        for i, p in enumerate(parts):
            try:
                os.link(p, tmp / f"part-{i:06d}.parquet")
            except OSError:
                shutil.copyfile(p, tmp / f"part-{i:06d}.parquet")
