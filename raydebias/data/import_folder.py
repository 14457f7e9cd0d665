"""``raydebias datasets import-folder``: an ImageFolder tree (+ optional bias CSV) → the Parquet contract.

Layouts: ``root/<split>/<class>/<image>`` (split ∈ train/val/test) or ``root/<class>/<image>``. The bias CSV has
columns ``path`` (relative to ``root``) and ``bias`` (ints kept as they are; otherwise every value is a name,
numbered in sorted order).
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import pyarrow as pa

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_SPLITS = {"train", "val", "test"}


def import_folder(root: str | os.PathLike, bias_csv: str | None = None, embed: bool = False) -> pa.Table:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"import-folder: {root} is not a directory")
    top = sorted(p.name for p in root.iterdir() if p.is_dir())
    split_dirs = [s for s in top if s in _SPLITS]
    entries: list[tuple[str | None, str, Path]] = []  # (split, class, file)
    if split_dirs:
        for s in split_dirs:
            for c in sorted(p.name for p in (root / s).iterdir() if p.is_dir()):
                entries += [(s, c, f) for f in sorted((root / s / c).rglob("*")) if f.suffix.lower() in IMAGE_EXTS]
    else:
        for c in top:
            entries += [(None, c, f) for f in sorted((root / c).rglob("*")) if f.suffix.lower() in IMAGE_EXTS]
    if not entries:
        raise ValueError(f"import-folder: no images under {root}")
    classes = sorted({c for _, c, _ in entries})
    bias_of: dict[str, str] = {}
    if bias_csv:
        with open(bias_csv, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "bias"} <= set(reader.fieldnames):
                raise ValueError(f"{bias_csv}: needs columns 'path' and 'bias', found {reader.fieldnames}")
            for row in reader:
                bias_of[Path(row["path"]).as_posix()] = row["bias"]
    values = set(bias_of.values())
    if all(v.strip().lstrip("-").isdigit() for v in values):  # integer bias ids are kept as they are
        bias_values = sorted(values, key=lambda v: int(v))
        bias_index = {v: int(v) for v in values}
    else:  # names (or a mix) are numbered in sorted order
        bias_values = sorted(values)
        bias_index = {v: i for i, v in enumerate(bias_values)}
    cols: dict[str, list] = {"id": [], "label": [], "split": [], "path": [], "image": [], "bias": []}
    missing_bias = []
    for split, c, f in entries:
        rel = f.relative_to(root).as_posix()
        cols["id"].append(hashlib.sha1(rel.encode()).hexdigest()[:16])
        cols["label"].append(classes.index(c))
        cols["split"].append(split)
        cols["path"].append(rel)
        cols["image"].append(f.read_bytes() if embed else None)
        b = bias_of.get(rel)
        if bias_csv and b is None:
            missing_bias.append(rel)
        cols["bias"].append(bias_index[b] if b is not None else None)
    if missing_bias:
        raise ValueError(f"{bias_csv}: no bias for {len(missing_bias)} image(s), e.g. {missing_bias[:3]}")
    data = {"id": pa.array(cols["id"], pa.string()), "label": pa.array(cols["label"], pa.int64())}
    if split_dirs:
        data["split"] = pa.array(cols["split"], pa.string())
    if embed:
        data["image"] = pa.array(cols["image"], pa.binary())
    else:
        data["path"] = pa.array(cols["path"], pa.string())
    if bias_csv:
        data["bias"] = pa.array(cols["bias"], pa.int64())
    meta = {b"class_names": ",".join(classes).encode(), b"bias_names": ",".join(bias_values).encode()}
    return pa.table(data).replace_schema_metadata(meta)
