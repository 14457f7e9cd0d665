"""The ``data`` stage: build the built-in dataset if no URI is given, then ingest it through the contract."""

from __future__ import annotations

from typing import Any

from raydebias._internal.io import atomic_write_json, fingerprint_uri, write_table_uri
from raydebias.config import RunConfig
from raydebias.core import StageResult
from raydebias.data.builtin.colored_mnist import CLASS_NAMES, COLOR_NAMES, build_colored_mnist
from raydebias.data.contract import SPLITS, ingest


def data_key(cfg: RunConfig) -> Any:
    d = cfg.data
    key: dict[str, Any] = d.model_dump(exclude={"batch_size"})
    if d.splits:
        key["content"] = {s: fingerprint_uri(u) for s, u in d.splits.items()}
    elif d.uri:
        key["content"] = fingerprint_uri(d.uri)
        key.pop("builtin")
    return key


def run_data(ctx) -> "StageResult":  # noqa: F821

    cfg = ctx.cfg.data
    out = ctx.stage_dir("data")
    outputs = []
    class_names, bias_names = cfg.class_names, cfg.bias_names
    source = cfg.uri
    ctx.ensure_ray()
    if source is None and not cfg.splits:
        b = cfg.builtin
        ctx.log(f"[data] building Colored MNIST (aligned={b.aligned}, seed={b.seed}) under {out}")
        source = str(out / "source.parquet")
        write_table_uri(build_colored_mnist(b), source)
        outputs.append(ctx.rel(out / "source.parquet"))
        class_names = class_names or CLASS_NAMES
        bias_names = bias_names or COLOR_NAMES
        cfg = cfg.model_copy(update={"class_names": class_names, "bias_names": bias_names, "image_size": b.image_size})
    res = ingest(cfg, source, out, ctx.run_dir / "quarantine.parquet", log=ctx.log)
    class_names = class_names or [str(i) for i in range(res.num_classes)]
    if res.num_bias is not None:
        bias_names = bias_names or [str(i) for i in range(res.num_bias)]
    info = {
        "source": cfg.splits or source,
        "image_size": cfg.image_size,
        "num_classes": res.num_classes,
        "num_bias": res.num_bias,
        "class_names": class_names,
        "bias_names": bias_names if res.num_bias is not None else None,
        "counts": res.counts,
        "group_counts": res.group_counts,
        "quarantined": res.quarantined,
        "quarantine_reasons": res.reasons,
    }
    atomic_write_json(out / "info.json", info)
    ctx.log(f"[data] rows per split: {res.counts}; quarantined: {res.quarantined}")
    if res.group_counts.get("train"):
        ctx.log("[data] train group counts (rows = class, cols = bias):")
        for y, row in enumerate(res.group_counts["train"]):
            ctx.log(f"         {class_names[y]:>12}: {row}")
    outputs += [ctx.rel(out / f"{s}.parquet") for s in SPLITS] + [ctx.rel(out / "info.json")]
    return StageResult(outputs, {k: info[k] for k in ("counts", "quarantined", "num_classes", "num_bias")})
