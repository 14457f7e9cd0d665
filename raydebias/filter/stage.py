"""``filter`` stage: score synthetic images with CLIP, keep the top ``keep`` per group, drop near-duplicates of
real training images; the kept set is what the classifier trains on."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydebias._internal.io import atomic_path, atomic_write_json
from raydebias.filter.clip_score import bias_match, clip_scores, label_targets, top_q
from raydebias.filter.dedup import duplicate_threshold, max_similarity, self_similarity


def run_filter(ctx, variant: str):
    import torch

    from raydebias.embed.stage import load_clip, load_embeddings
    from raydebias.core import StageResult

    cfg, info = ctx.cfg, ctx.data_info
    torch.set_num_threads(max(1, cfg.ray.num_cpus or 2))
    out = ctx.stage_dir(f"filter/{variant}")
    t = pq.read_table(ctx.run_dir / "stages" / "generate" / variant / "synthetic.parquet")
    # encoded by the run's CLIP in the generate actors (where the accelerators are), not here on the driver
    emb = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    y, a = t.column("label").to_numpy(), t.column("bias").to_numpy()
    B = info["num_bias"] or 1
    groups = y * B + a
    clip = load_clip(ctx.run_dir)
    texts, label_idx = label_targets(cfg.filter.label_prompt, info["class_names"], info.get("bias_names"), y, a)
    label_emb = clip.encode_texts(texts)
    real = load_embeddings(ctx.run_dir)
    real_groups = real["y"] * B + np.maximum(real["a"], 0)
    centroids = {int(g): real["emb"][real_groups == g].mean(0) for g in np.unique(real_groups)
                 if (real_groups == g).sum() >= cfg.filter.min_real_for_centroid}
    scores = clip_scores(emb, groups, label_emb, label_idx, centroids, cfg.filter.alpha)
    keep = top_q(scores, groups, cfg.filter.keep)
    check = None
    if cfg.filter.bias_check:
        if not info.get("bias_names") or not len(a) or (a < 0).any():
            check = {"skipped": "the synthetic images have no bias target (dataset without bias labels)"}
        else:
            match = bias_match(emb, label_emb, y, a, B)
            check = {"failed": int((~match).sum()), "failed_after_score": int((keep & ~match).sum())}
            keep &= match
    sim = max_similarity(emb, real["emb"])
    threshold = duplicate_threshold(cfg.filter.dedup_threshold, self_similarity(real["emb"]),
                                    cfg.filter.dedup_real_quantile)
    dup = sim >= threshold
    final = keep & ~dup
    tbl = t.filter(pa.array(final)).append_column("score", pa.array(scores[final], pa.float32()))
    with atomic_path(out / "synthetic.parquet") as tmp:
        pq.write_table(tbl, tmp)
    stats = {"generated": int(len(final)), "kept_by_score": int(keep.sum()),
             "dedup_threshold": threshold, "near_duplicates_of_real": int(dup.sum()),
             "dropped_as_duplicates_after_score": int((keep & dup).sum()),
             "kept": int(final.sum()), "alpha": cfg.filter.alpha, "keep": cfg.filter.keep,
             **({"bias_check": check} if check is not None else {}),
             "groups_left_empty": int(len(np.unique(groups)) - len(np.unique(groups[final]))),
             "groups_with_centroid": len(centroids), "max_sim_to_real_p99": float(np.quantile(sim, 0.99)) if len(sim) else None}
    if cfg.models.source == "pretrained":
        # FID/KID of the kept set against the real training images on the pretrained CLIP's features: the embed
        # stage's embeddings and the ones scored above, nothing encoded twice. With the bootstrap CLIP these
        # numbers said nothing (FID 0.21 in the demo); generation fidelity (evaluate, class/bias probes on val) is
        # the measure there.
        from raydebias.evaluate.fid import fid_kid_features

        stats["fid_kid_clip_features"] = fid_kid_features(real["emb"], emb[final])
        per_group = {}
        for g in np.unique(groups[final]):
            rf, ff = real["emb"][real_groups == g], emb[final & (groups == g)]
            if len(rf) >= 20 and len(ff) >= 10:
                per_group[f"{g // B},{g % B}"] = fid_kid_features(rf, ff, kid_subset=min(len(rf), len(ff)))["kid"]
        stats["kid_per_group_clip_features"] = per_group
    atomic_write_json(out / "stats.json", stats)
    ctx.log(f"[filter/{variant}] {stats}")
    if not final.any():
        raise RuntimeError(f"filter/{variant}: no synthetic image survived filtering ({stats}); check the CLIP "
                           "model (clip.steps) or raise filter.dedup_threshold")
    return StageResult([ctx.rel(out / "synthetic.parquet"), ctx.rel(out / "stats.json")], stats)
