"""DiffInject (docs/methods/diffinject.md): mine bias-conflicting rows with a GCE-biased classifier,
inject their h-space content into aligned images (``inject.py`` beside this module holds the tensor functions),
retrain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from raydebias._internal.io import (
    as_path,
    atomic_path,
    atomic_write_json,
    atomic_write_table,
    link_parts,
    load_safetensors,
    remove_path,
    sha256_json,
)
from raydebias.core import StageResult
from raydebias.core.seeds import sample_seeds
from raydebias.data.stream import count_rows, parquet_parts, read_columns, take_ids, take_rows
from raydebias.data.transforms import resize_uint8, to_model_input
from raydebias.debias.lff import mine_conflicting
from raydebias.debias.train import fit_augmented, fit_classifier, score_train_split
from raydebias.diffusion.base import load_stage_model
from raydebias.evaluate.metrics import conflicting_mask, error_set_quality
from raydebias.evaluate.report import image_rows, kv_table
from raydebias.methods.diffinject.inject import ddim_invert, inject_generate, record_h
from raydebias.methods.shared import editing_base
from raydebias.models.sampling import to_uint8


def run_mine(ctx):
    """Train the biased classifier f_B with GCE (q = ``diffinject.gce_q``, no val selection: it should stay
    biased), score every training row by its CE under f_B and keep the top-K per class (``mined.parquet``)."""
    import pyarrow as pa

    info, di = ctx.data_info, ctx.cfg.diffinject
    out = ctx.stage_dir("mine")
    phases = [{"name": "gce", "data": "train", "recipe": "gce", "epochs": di.biased_epochs, "sampler": "uniform",
               "recipe_args": {"q": di.gce_q}}]
    fit_classifier(ctx, "biased_gce", phases, out_name="mine/model")
    tr, probs, loss = score_train_split(ctx, out / "model")
    top = mine_conflicting(loss, tr["y"], k=di.top_k)
    atomic_write_table(out / "mined.parquet", pa.table({
        "id": tr["id"][top].tolist(), "label": tr["y"][top], "loss": loss[top].astype(np.float32)}))
    stats = {"mined": int(len(top)), "top_k": di.top_k,
             "biased_train_accuracy": float((probs.argmax(1) == tr["y"]).mean())}
    if info["num_bias"] is not None and (tr["a"] >= 0).all():
        conf = conflicting_mask(tr["y"], tr["a"], info["group_counts"]["train"])
        picked = np.zeros(len(conf), bool)
        picked[top] = True
        stats["mined_vs_conflicting"] = error_set_quality(~picked, conf)  # "errors" = the mined set
    atomic_write_json(out / "stats.json", stats)
    ctx.log(f"[mine] top-{di.top_k} per class under the GCE model: {stats}")
    return StageResult([ctx.rel(out / "model"), ctx.rel(out / "mined.parquet"), ctx.rel(out / "stats.json")],
                       stats)


def inject_task(run_dir: str, di: dict, part: int, style_ids: list, content_ids: list, seeds: list[int],
                threads: int) -> str:
    """One Ray task: generate the synthetic images of one batch of (style, content) pairs and write
    ``parts/part-<n>.parquet``. DDIM inversions (style: x_T; content: x_T and the recorded h_t) are cached per
    image under ``cache/`` (safetensors) and reused by every task and rerun with the same model and steps."""

    import pyarrow as pa
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    run, out = as_path(run_dir), as_path(run_dir) / "stages" / "inject"
    info = json.loads((run / "stages" / "data" / "info.json").read_text())
    train = run / "stages" / "data" / "train.parquet"

    def rows_of(ids: list) -> tuple[np.ndarray, np.ndarray]:
        """Labels and images of the training rows ``ids``, in that order (only this task's rows are read)."""
        t, x = take_ids(train, list(map(str, dict.fromkeys(ids))), info["image_size"])
        pos = {i: k for k, i in enumerate(t.column("id").to_pylist())}
        k = [pos[str(i)] for i in ids]
        return t.column("label").to_numpy()[k], x[k]
    bundle = load_stage_model(run, di["base"])
    context = bundle.embed_prompts([di["prompt"]])
    cache = out / "cache" / di["cache_key"]
    cache.mkdir(parents=True, exist_ok=True)

    def inverted(ids: list, with_h: bool) -> dict[str, torch.Tensor]:
        import hashlib

        path = lambda i: cache / (hashlib.sha1(str(i).encode()).hexdigest() + ".safetensors")  # noqa: E731
        todo = [i for i in dict.fromkeys(ids) if not path(i).exists()
                or (with_h and "h" not in load_safetensors(path(i)))]
        for lo in range(0, len(todo), 64):
            chunk = todo[lo : lo + 64]
            z0 = bundle.encode(to_model_input(resize_uint8(rows_of(chunk)[1], bundle.resolution)))
            z_T = ddim_invert(bundle, z0, di["num_steps"], context)
            hs = record_h(bundle, z_T, di["num_steps"], context, di["t_edit"]) if with_h else None
            for k, i in enumerate(chunk):
                tensors = {"z_T": z_T[k].contiguous()}
                if hs is not None:
                    tensors["h"] = hs[:, k].contiguous()
                with atomic_path(path(i)) as tmp:
                    save_file(tensors, str(tmp))
        return {i: load_safetensors(path(i)) for i in dict.fromkeys(ids)}

    styles, contents = inverted(style_ids, False), inverted(content_ids, True)
    z_T = torch.stack([styles[i]["z_T"] for i in style_ids])
    h_c = torch.stack([contents[i]["h"] for i in content_ids], dim=1)
    z0 = inject_generate(bundle, z_T, h_c, di["num_steps"], context, di["t_edit"], di["t_boost"], di["gamma"],
                         di["eta"], seeds)
    pixels = resize_uint8(to_uint8(bundle.decode(z0)), info["image_size"])
    labels = rows_of(content_ids)[0]
    path = out / "parts" / f"part-{part:05d}.parquet"
    atomic_write_table(path, pa.table({
        "row": np.arange(len(seeds), dtype=np.int64) + part * di["pairs_per_task"], "label": labels,
        "style_id": list(map(str, style_ids)), "content_id": list(map(str, content_ids)),
        "seed": np.asarray(seeds, np.int64), "pixels": [np.ascontiguousarray(p).tobytes() for p in pixels]}))
    return str(path)


def plan_pairs(ids: np.ndarray, mined: set, n: int, seed: int) -> tuple[list, list]:
    """``n`` (style, content) pairs: contents cycle through the mined (bias-conflicting) rows, styles are
    distinct randomly chosen non-mined (presumed bias-aligned) rows (with replacement only when too few)."""
    rng = np.random.default_rng(seed)
    aligned = np.array([i for i in ids if i not in mined], dtype=object)
    contents = sorted(mined)
    if not len(aligned) or not contents:
        raise ValueError("DiffInject needs mined (conflicting) and remaining (aligned) training rows")
    styles = rng.choice(aligned, size=n, replace=n > len(aligned))
    return list(styles), [contents[k % len(contents)] for k in rng.permutation(n)]


def run_inject(ctx):
    """Pairs → one Ray task per ``pairs_per_task`` → ``synthetic.parquet``. Resumable: finished parts are kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    cfg, info, di = ctx.cfg, ctx.data_info, ctx.cfg.diffinject
    out = ctx.stage_dir("inject")
    train_ids = np.asarray(read_columns(ctx.run_dir / "stages" / "data" / "train.parquet", ["id"]).column("id")
                           .to_pylist(), dtype=object)  # the ids only: the tasks read their own rows' images
    mined = set(pq.read_table(str(ctx.run_dir / "stages" / "mine" / "mined.parquet")).column("id").to_pylist())
    n = int(round(di.bias_conflict_ratio * (len(train_ids) - len(mined))))
    styles, contents = plan_pairs(train_ids, mined, n, cfg.seed)
    seeds = sample_seeds(cfg.seed, n)
    # the inversion cache depends only on the edited model's weights (their hashes in the manifest) and the
    # inversion steps
    base = editing_base(cfg)
    base_hash = sha256_json(json.loads((ctx.run_dir / "manifest.json").read_text())["stages"][base]["outputs"])
    task_cfg = {**di.model_dump(include={"prompt", "num_steps", "t_edit", "t_boost", "gamma", "eta",
                                         "pairs_per_task"}),
                "base": base, "cache_key": sha256_json([base_hash, di.num_steps, di.t_edit, di.prompt])[:16]}
    plan_key = sha256_json([ctx.node_key, task_cfg])
    parts_dir = out / "parts"
    if (out / "plan.json").exists() and json.loads((out / "plan.json").read_text()).get("key") != plan_key:
        remove_path(parts_dir)  # a different plan: old parts are not rows of this one
    atomic_write_json(out / "plan.json", {"key": plan_key, "pairs": n})
    ctx.ensure_ray()
    task = ray.remote(num_cpus=di.cpus_per_task, num_gpus=cfg.ray.num_gpus_per_worker or 0,
                      max_retries=2, retry_exceptions=True)(inject_task)
    k = di.pairs_per_task
    refs, reused = [], 0
    for p, lo in enumerate(range(0, n, k)):
        if (parts_dir / f"part-{p:05d}.parquet").exists():
            reused += 1
            continue
        refs.append(task.remote(str(ctx.run_dir), task_cfg, p, styles[lo : lo + k], contents[lo : lo + k],
                                seeds[lo : lo + k], max(1, int(di.cpus_per_task))))
    ctx.log(f"[inject] {n} pairs ({len(mined)} mined contents, γ={di.gamma}, t_edit={di.t_edit}, {di.num_steps} "
            f"DDIM steps): {len(refs)} Ray task(s), {reused} finished part(s) reused")
    ray.get(refs)
    # parts in name order hold rows 0..n-1 in order; the driver reads their row and label columns only
    parts = sorted(parts_dir.glob("part-*.parquet"))
    small = pa.concat_tables([pq.read_table(str(p), columns=["row", "label"]) for p in parts]) if parts else None
    if small is None or small.column("row").to_pylist() != list(range(n)):
        raise RuntimeError(f"inject: expected rows 0..{n - 1} in order, found {0 if small is None else small.num_rows}")
    link_parts(parts, out / "synthetic.parquet")
    labels = small.column("label").to_numpy()
    stats = {"synthetic": n, "per_class": np.bincount(labels, minlength=info["num_classes"]).tolist(),
             "parts_reused": reused}
    atomic_write_json(out / "stats.json", stats)
    return StageResult([ctx.rel(out / "synthetic.parquet"), ctx.rel(out / "stats.json")], stats)


def run_train_diffinject(ctx):
    """Retrain on D_orig ∪ D_syn (synthetic labels = the content image's label); val selects the epoch."""
    return fit_augmented(ctx, "diffinject", ctx.run_dir / "stages" / "inject" / "synthetic.parquet")


def report_sections(run_dir: Path, info: dict, report: dict, samples_per_group: int) -> list[str]:
    """Style / content / injected image rows, mining and synthesis statistics."""


    import pyarrow as pa
    import pyarrow.compute as pc

    parts, st, gen = [], run_dir / "stages", report.get("generation", {})
    if (st / "inject" / "synthetic.parquet").exists() and "inject" in gen:
        path = st / "inject" / "synthetic.parquet"
        n = min(10, count_rows(parquet_parts(path)))
        t, x = take_rows(path, np.arange(n), info["image_size"])
        train_ids = read_columns(st / "data" / "train.parquet", ["id"]).column("id")
        wanted = pa.concat_arrays([t.column("style_id").combine_chunks(), t.column("content_id").combine_chunks()])
        pos = pc.index_in(wanted, value_set=train_ids).to_numpy(zero_copy_only=False)
        _, both = take_rows(st / "data" / "train.parquet", pos.astype(np.int64), info["image_size"])
        styles, contents = both[:n], both[n:]
        grid = image_rows([("style (aligned)", styles), ("content (mined)", contents), ("injected", x[:n])],
                          "DiffInject: content h-space injected into style images (label = content's)")
        parts.append("<h3>DiffInject</h3><p>mining</p>" + kv_table(gen.get("mine", {}))
                     + "<p>synthetic</p>" + kv_table(gen["inject"]) + f"<img src='{grid}'>")
    return parts
