"""``filter`` stage: score synthetic images with CLIP, keep the top ``keep`` per group, drop near-duplicates of
real training images; the kept set is what the classifier trains on.

Two streaming passes over the generated parts, no image on the driver: Ray Data tasks (each worker process with the
faiss index of the real training embeddings, built once) score every row from the embeddings the generate actors stored; the
driver picks the top ``keep`` of every group from the small per-row columns (group, score, bias match, similarity);
Ray Data tasks then write each part's kept rows."""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydebias._internal.io import (
    as_path,
    atomic_write_json,
    atomic_write_table,
    file_stamp,
    remove_path,
    replace_path,
)
from raydebias._internal.ray_utils import map_items
from raydebias.core import StageResult
from raydebias.data.stream import parquet_parts
from raydebias.embed.stage import load_clip
from raydebias.evaluate.fid import fid_kid_features
from raydebias.filter.clip_score import (
    bias_match,
    clip_scores,
    label_targets,
    scores_groups,
    top_q,
)
from raydebias.filter.dedup import duplicate_threshold, flat_index, max_similarity, self_similarity


def _real_embeddings(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = pq.read_table(str(path), columns=["label", "bias", "embedding"])
    emb = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32) if t.num_rows else \
        np.zeros((0, 1), np.float32)
    return t.column("label").to_numpy(), t.column("bias").to_numpy(), emb


def real_reference(path: str, num_bias: int, min_real: int, threshold: float, quantile: float) -> dict:
    """From the real training embeddings: each group's centroid (groups with at least ``min_real`` images) and the
    near-duplicate threshold (:func:`duplicate_threshold`)."""
    y, a, emb = _real_embeddings(path)
    groups = y * num_bias + np.maximum(a, 0)
    centroids = {int(g): emb[groups == g].mean(0) for g in np.unique(groups) if (groups == g).sum() >= min_real}
    return {"centroids": centroids, "threshold": duplicate_threshold(threshold, self_similarity(emb), quantile)}


_INDEX: dict[tuple[str, str], object] = {}  # per worker process: the faiss index of the real embeddings


def _real_index(real_path: str):
    key = (real_path, file_stamp(real_path))
    if key not in _INDEX:
        _INDEX.clear()
        _INDEX[key] = flat_index(_real_embeddings(real_path)[2])
    return _INDEX[key]


def _score_parts(batch: dict, real_path: str, label_emb: np.ndarray, per_group: bool, num_bias: int,
                 centroids: dict[int, np.ndarray], alpha: float, bias_check: bool) -> dict:
    """Ray task (:func:`~raydebias._internal.ray_utils.map_items`): synthetic parts → per row the CLIP-Score, the zero-shot bias match and the cosine
    similarity to the nearest real training image. Pixels are never read: the generate actors stored each image's
    CLIP embedding. The faiss index of the real embeddings is built once per worker process."""
    index = _real_index(real_path)
    cols: dict[str, list] = {k: [] for k in ("part", "row", "group", "score", "match", "sim")}
    for i, part in zip(batch["index"], batch["part"]):
        t = pq.read_table(str(part), columns=["label", "bias", "embedding"])
        n = t.num_rows
        if not n:
            continue
        y, a = t.column("label").to_numpy().astype(np.int64), t.column("bias").to_numpy().astype(np.int64)
        emb = np.ascontiguousarray(np.stack(t.column("embedding").to_numpy(zero_copy_only=False)), np.float32)
        groups = y * num_bias + a
        label_idx = y * num_bias + a if per_group else y
        match = bias_match(emb, label_emb, y, a, num_bias) if bias_check else np.ones(n, bool)
        for k, v in (("part", np.full(n, int(i))), ("row", np.arange(n)), ("group", groups),
                     ("score", clip_scores(emb, groups, label_emb, label_idx, centroids, alpha)),
                     ("match", match), ("sim", max_similarity(emb, None, index))):
            cols[k].append(v)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}


def _write_kept(batch: dict) -> dict:
    """Ray task (:func:`~raydebias._internal.ray_utils.map_items`): for each part, its kept ``rows`` with their
    ``scores``, written to ``dst``."""
    n = []
    for part, rows, scores, dst in zip(batch["part"], batch["rows"], batch["scores"], batch["dst"]):
        t = pq.read_table(str(part)).take(pa.array(np.asarray(rows, np.int64)))
        atomic_write_table(str(dst), t.append_column("score", pa.array(np.asarray(scores, np.float32))))
        n.append(t.num_rows)
    return {"rows": np.asarray(n, np.int64)}


def fid_of_kept(real_path: str, kept: str, num_bias: int) -> dict:
    """Ray task: FID/KID of the kept set against the real training images on the pretrained CLIP's features (the
    embed stage's embeddings and the ones scored here: nothing is encoded twice), overall and per group."""
    y, a, real = _real_embeddings(real_path)
    rg = y * num_bias + np.maximum(a, 0)
    t = pq.read_table(str(kept), columns=["label", "bias", "embedding"])
    fake = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    fg = t.column("label").to_numpy() * num_bias + t.column("bias").to_numpy()
    per_group = {}
    for g in np.unique(fg):
        rf, ff = real[rg == g], fake[fg == g]
        if len(rf) >= 20 and len(ff) >= 10:
            per_group[f"{g // num_bias},{g % num_bias}"] = fid_kid_features(rf, ff, kid_subset=min(len(rf), len(ff)))["kid"]
    return {"fid_kid_clip_features": fid_kid_features(real, fake), "kid_per_group_clip_features": per_group}


def run_filter(ctx, variant: str):
    import ray

    cfg, info = ctx.cfg, ctx.data_info
    ctx.ensure_ray()
    out = ctx.stage_dir(f"filter/{variant}")
    parts = parquet_parts(ctx.run_dir / "stages" / "generate" / variant / "synthetic.parquet")
    real_path = str(ctx.run_dir / "stages" / "embed" / "train.parquet")
    B = info["num_bias"] or 1
    # centroids and the duplicate threshold from the real embeddings, in a Ray task while the driver encodes texts
    ref = ray.remote(num_cpus=1)(real_reference).remote(
        real_path, B, cfg.filter.min_real_for_centroid, cfg.filter.dedup_threshold, cfg.filter.dedup_real_quantile)
    ya = pa.concat_tables([pq.read_table(str(p), columns=["label", "bias"]) for p in parts])
    y, a = ya.column("label").to_numpy(), ya.column("bias").to_numpy()
    texts, _ = label_targets(cfg.filter.label_prompt, info["class_names"], info.get("bias_names"), y, a)
    per_group = scores_groups(cfg.filter.label_prompt, info.get("bias_names"), a)
    label_emb = load_clip(ctx.run_dir).encode_texts(texts)
    check = None
    if cfg.filter.bias_check and not per_group:  # bias_check's validator requires {bias} in label_prompt
        check = {"skipped": "the synthetic images have no bias target (dataset without bias labels)"}
    ref = ray.get(ref)

    # pass 1: per-row scores by Ray tasks over the parts; the driver gets the small columns
    batches = map_items(_score_parts, {"index": list(range(len(parts))), "part": parts},
                        {"real_path": real_path, "label_emb": label_emb, "per_group": per_group, "num_bias": B,
                         "centroids": ref["centroids"], "alpha": cfg.filter.alpha,
                         "bias_check": bool(cfg.filter.bias_check and check is None)})
    col = {k: np.concatenate([b[k] for b in batches]) for k in ("part", "row", "group", "score", "match", "sim")}
    order = np.lexsort((col["row"], col["part"]))  # the parts' row order, whatever order the tasks finished in
    col = {k: v[order] for k, v in col.items()}
    col["part"], col["row"] = col["part"].astype(np.int64), col["row"].astype(np.int64)
    groups, scores, sim = col["group"].astype(np.int64), col["score"].astype(np.float32), col["sim"]
    keep = top_q(scores, groups, cfg.filter.keep)
    if cfg.filter.bias_check and check is None:
        match = col["match"].astype(bool)
        check = {"failed": int((~match).sum()), "failed_after_score": int((keep & ~match).sum())}
        keep &= match
    threshold = ref["threshold"]
    dup = sim >= threshold
    final = keep & ~dup
    if not final.any():
        raise RuntimeError(f"filter/{variant}: no synthetic image survived filtering ({int(len(final))} generated, "
                           f"{int(keep.sum())} kept by score, {int(dup.sum())} near-duplicates of real images); "
                           "check the CLIP model (clip.steps) or raise filter.dedup_threshold")

    # pass 2: each part's kept rows, written by Ray tasks into a folder that replaces the old output whole
    dst = out / "synthetic.parquet"
    tmp = out / f".synthetic.parquet.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        items = []
        for i, p in enumerate(parts):
            sel = (col["part"] == i) & final
            if sel.any():
                items.append({"part": p, "rows": col["row"][sel].tolist(), "scores": scores[sel].tolist(),
                              "dst": str(tmp / as_path(p).name)})
        written = sum(int(b["rows"].sum()) for b in map_items(
            _write_kept, {k: [it[k] for it in items] for k in ("part", "rows", "scores", "dst")}))
        if written != int(final.sum()):
            raise RuntimeError(f"filter/{variant}: {written} rows written, {int(final.sum())} kept")
        replace_path(tmp, dst)
    finally:
        remove_path(tmp)
    stats = {"generated": int(len(final)), "kept_by_score": int(keep.sum()),
             "dedup_threshold": threshold, "near_duplicates_of_real": int(dup.sum()),
             "dropped_as_duplicates_after_score": int((keep & dup).sum()),
             "kept": int(final.sum()), "alpha": cfg.filter.alpha, "keep": cfg.filter.keep,
             **({"bias_check": check} if check is not None else {}),
             "groups_left_empty": int(len(np.unique(groups)) - len(np.unique(groups[final]))),
             "groups_with_centroid": len(ref["centroids"]),
             "max_sim_to_real_p99": float(np.quantile(sim, 0.99)) if len(sim) else None}
    if cfg.models.source == "pretrained":
        # With the bootstrap CLIP these numbers said nothing (FID 0.21 in the demo); generation fidelity (evaluate,
        # class/bias probes on val) is the measure there.
        stats.update(ray.get(ray.remote(num_cpus=1)(fid_of_kept).remote(real_path, str(dst), B)))
    atomic_write_json(out / "stats.json", stats)
    ctx.log(f"[filter/{variant}] {stats}")
    return StageResult([ctx.rel(dst), ctx.rel(out / "stats.json")], stats)
