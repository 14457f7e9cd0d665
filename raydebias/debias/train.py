"""The ``train`` stage: one classifier recipe trained through Ray Train (``TorchTrainer``).

Data travels to the workers through the object store (no shared filesystem needed); every epoch rank 0
evaluates on val, keeps the best state by the selection metric, and reports a checkpoint (safetensors) so a
failed worker group restarts from the last epoch (``FailureConfig``). The best model lands in
``stages/train/<method>/model.safetensors`` with ``meta.json``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from raydebias._internal.io import atomic_path, atomic_write_json, remove_path, save_weights
from raydebias._internal.ray_utils import fit_torch, get_checkpoint, keyed_train_run, report
from raydebias.config import ClassifierModelConfig
from raydebias.core import StageResult
from raydebias.data.stream import (
    PartSet,
    buffer_rows,
    count_rows,
    epoch_counts,
    iter_parts,
    parquet_parts,
    stream_epoch,
    write_parts,
)
from raydebias.data.transforms import to_model_input
from raydebias.debias import RECIPES
from raydebias.debias.groupdro import group_balanced_weights
from raydebias.evaluate.metrics import group_metrics
from raydebias.evaluate.predict import predict_parts
from raydebias.models.classifier import create_classifier, predict


def resolve_select_by(select_by: str, num_groups: int) -> str:
    """``auto`` → WGA with few groups, AGA (unbiased accuracy) with many (see docs/metrics.md)."""
    if select_by != "auto":
        return select_by
    return "wga" if num_groups <= 8 else "aga"


def score_train_split(ctx, model_dir: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The run's training split (``id``, ``y``, ``a``), a trained classifier's softmax on it and each row's CE
    (−log p_y), computed by Ray Data tasks: how the bias amplifier, DiffInject's GCE model and the ERM error set
    are read."""
    parts = [(p, "train", False) for p in parquet_parts(ctx.run_dir / "stages" / "data" / "train.parquet")]
    r = predict_parts(ctx, parts, {"m": model_dir}, with_probs=True, with_ids=True)["train"]
    tr = {"id": r["id"].astype(object), "y": r["label"].astype(np.int64), "a": r["bias"].astype(np.int64)}
    probs = r["probs:m"]
    loss = -np.log(np.clip(probs[np.arange(len(tr["y"])), tr["y"]], 1e-12, None)) if len(probs) else np.zeros(0)
    return tr, probs, loss


def _augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation of each image by up to ``pad`` pixels (zero/background padding + crop)."""
    n, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)
    shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen).tolist()
    return torch.stack([xp[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts)])


def _sample_weights(kind: str, recipe, y: np.ndarray, groups: np.ndarray) -> np.ndarray | None:
    if kind == "recipe":
        return recipe.sample_weights(y, groups)
    if kind == "class_balanced":
        return group_balanced_weights(y)
    if kind == "group_balanced":
        return group_balanced_weights(groups)
    return None


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker: a sequence of phases (ERM/GroupDRO = one phase; the two-stage recipe =
    synthetic pre-training then last-layer retraining), selection on val in the phases marked ``select``. A phase
    with ``from`` starts from the weights at the end of that earlier phase: several stage-2 variants branch from one
    pre-trained model and val picks among all their epochs."""
    import ray
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, int(config["threads"])))
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    sets = {name: PartSet.union([PartSet.open(**m) for m in members]) for name, members in config["data"].items()}
    val = sets["val"]
    size, buffer_rows = config["image_size"], config["shuffle_buffer"]
    C, B = config["num_classes"], config["num_bias"]
    has_bias = B is not None
    num_groups = C * B if has_bias else C
    torch.manual_seed(config["seed"])
    model = create_classifier(ClassifierModelConfig(**config["classifier"]), C)
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    phases = config["phases"]
    # (phase, epoch) pairs in order; a checkpoint stores the index of the last finished one.
    schedule = [(p, e) for p, ph in enumerate(phases) for e in range(ph["epochs"])]
    # a phase with "from" starts from the weights at the end of that earlier phase (stage-2 branches)
    names = [ph["name"] for ph in phases]
    sources = {names.index(ph["from"]) for ph in phases if ph.get("from")}
    start, best_score, best_epoch = 0, -math.inf, -1
    best_state = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
    ends: dict[int, dict[str, torch.Tensor]] = {}  # phase index → its final weights, for the phases in sources
    opt_state = recipe_state = None
    ckpt = get_checkpoint()
    if ckpt:  # resume after a worker failure
        with ckpt.as_directory() as d:
            core.load_state_dict(load_file(f"{d}/model.safetensors"))
            best_state = load_file(f"{d}/best.safetensors")
            ends = {q: load_file(f"{d}/end_{q}.safetensors") for q in sources if Path(f"{d}/end_{q}.safetensors").exists()}
            opt_state = torch.load(f"{d}/optimizer.pt", weights_only=True)
            recipe_state = load_file(f"{d}/recipe.safetensors") if Path(f"{d}/recipe.safetensors").exists() else {}
            st = json.loads(Path(f"{d}/state.json").read_text())
            start, best_score, best_epoch = st["step"] + 1, st["best_score"], st["best_epoch"]

    gen = torch.Generator().manual_seed(config["seed"] + rank)
    bs = config["batch_size"]
    keep_last = not any(q.get("select") for q in phases)  # nothing to select on: keep the last epoch
    current_phase, opt, recipe = None, None, None
    for step in range(start, len(schedule)):
        p, epoch = schedule[step]
        ph = phases[p]
        if p != current_phase:  # enter a phase: recipe, frozen parts, optimizer
            current_phase = p
            recipe = RECIPES[ph["recipe"]](ph.get("num_groups", num_groups), eta=config["groupdro_eta"],
                                           **ph.get("recipe_args", {}))
            if ph.get("from") and epoch == 0:
                core.load_state_dict(ends[names.index(ph["from"])])
            for prm in core.parameters():
                prm.requires_grad_(True)
            if ph.get("freeze_encoder"):
                for prm in core.encoder.parameters():
                    prm.requires_grad_(False)
                if epoch == 0:
                    core.head.reset_parameters()  # last-layer retraining starts from a fresh head
            params = [prm for prm in model.parameters() if prm.requires_grad]
            opt = torch.optim.AdamW(params, lr=ph.get("lr", config["lr"]), weight_decay=config["weight_decay"])
            if opt_state is not None and step == start and epoch > 0:  # resumed inside this phase
                opt.load_state_dict(opt_state)
                recipe.load_state_dict(recipe_state or {})
            d = sets[ph["data"]]
            if d.g is not None:  # explicit (pseudo-)groups, e.g. Diffusing DeBias's (y, amplifier correct)
                groups = d.g
            else:
                groups = d.y * B + d.a if has_bias and (d.a >= 0).all() else d.y
            weights = _sample_weights(ph.get("sampler", "recipe"), recipe, d.y, groups)
        model.train()
        if ph.get("freeze_encoder"):
            core.encoder.eval()  # frozen BatchNorm statistics too
        rng = np.random.default_rng([config["seed"], step])  # the same draws on every rank; ranks take shards
        counts = epoch_counts(len(d), weights, rng, rank, world)
        total, seen = 0.0, 0
        for b, xb in stream_epoch(d, counts, size, bs, buffer_rows, [config["seed"], step, rank]):
            if len(b) < 2:
                continue
            x = to_model_input(xb)
            if config["augment"]:
                x = _augment(x, gen)
            y = torch.as_tensor(d.y[b]).to(device)
            g = torch.as_tensor(groups[b]).to(device)
            kw = {"idx": torch.as_tensor(b)} if getattr(recipe, "needs_index", False) else {}
            if getattr(recipe, "needs_features", False):
                logits, feats = model(x.to(device), return_features=True)
                loss = recipe(logits, y, g, features=feats, **kw)
            else:
                loss = recipe(model(x.to(device)), y, g, **kw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
            seen += len(b)
        metrics: dict[str, Any] = {"step": step, "phase": p, "epoch": epoch, "train_loss": total / max(seen, 1)}
        if p in sources and epoch == ph["epochs"] - 1:
            ends[p] = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
        checkpoint = None
        if rank == 0:
            msg = ""
            if keep_last:
                best_epoch = step
                best_state = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
            if ph.get("select"):
                pred = np.concatenate([predict(core, x, device=device).argmax(1) if len(x) else np.zeros(0, np.int64)
                                       for _, x in iter_parts(val, size)] or [np.zeros(0, np.int64)])
                m = group_metrics(val.y, pred, val.a if has_bias else None, C, B if has_bias else 1)
                sel = config["select_by"] if has_bias else "accuracy"
                score = m[sel] if m.get(sel) is not None else m["accuracy"]
                metrics.update(val_accuracy=m["accuracy"], val_wga=m.get("wga"), val_aga=m.get("aga"), val_score=score)
                if score > best_score:
                    best_score, best_epoch = score, step
                    best_state = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
                msg = (f" val acc {m['accuracy']:.3f} wga {_f(m.get('wga'))} aga {_f(m.get('aga'))} "
                       f"({config['select_by']}={score:.3f}, best step {best_epoch + 1})")
            tmp = tempfile.mkdtemp(prefix="ckpt-")
            save_weights(f"{tmp}/model.safetensors", core)
            save_weights(f"{tmp}/best.safetensors", best_state)
            for q, st in ends.items():
                save_weights(f"{tmp}/end_{q}.safetensors", st)
            torch.save(opt.state_dict(), f"{tmp}/optimizer.pt")
            rs = recipe.state_dict()
            if rs:
                save_file(rs, f"{tmp}/recipe.safetensors")
            best_phase = names[schedule[best_epoch][0]] if best_epoch >= 0 else None
            Path(f"{tmp}/state.json").write_text(json.dumps(
                {"step": step, "best_score": best_score, "best_epoch": best_epoch, "best_phase": best_phase}))
            checkpoint = tmp
            print(f"[train/{config['method']}] {ph['name']} epoch {epoch + 1}/{ph['epochs']} "
                  f"loss {metrics['train_loss']:.4f}{msg}", flush=True)
        metrics["best_epoch"] = best_epoch
        report(metrics, checkpoint)  # persists the checkpoint directory, then removes it
    return {"best_epoch": best_epoch, "best_score": best_score}


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def baseline_phases(method: str, epochs: int) -> list[dict[str, Any]]:
    return [{"name": method, "data": "train", "recipe": method, "epochs": epochs, "sampler": "recipe", "select": True}]


def fit_classifier(ctx, method: str, phases: list[dict[str, Any]], extra_data: dict[str, Any] | None = None,
                   summary: dict[str, Any] | None = None, out_name: str | None = None):
    """Train ``phases`` through Ray Train (:func:`~raydebias._internal.ray_utils.fit_torch`); write the
    val-selected model (the last one when no phase has ``select``) to ``stages/<out_name>/`` (default
    ``train/<method>``)."""

    cfg = ctx.cfg
    ctx.ensure_ray()
    info = ctx.data_info
    data_dir = ctx.run_dir / "stages" / "data"
    size = info["image_size"]
    num_bias = info["num_bias"]
    num_groups = info["num_classes"] * (num_bias or 1)
    select_by = resolve_select_by(cfg.train.select_by, num_groups)
    out = ctx.stage_dir(out_name or f"train/{method}")
    tc = cfg.train
    use_gpu = cfg.ray.num_gpus_per_worker > 0
    # every set as Parquet parts that the workers stream: the data stage's splits, and in-memory extra sets written
    # beside the stage's output
    sources = {s: {"files": parquet_parts(data_dir / f"{s}.parquet")} for s in ("train", "val")}
    inputs = out / "inputs"
    remove_path(inputs)
    for name, d in (extra_data or {}).items():
        if not isinstance(d, dict):  # a path: a Parquet file or folder of (label, [bias], pixels)
            sources[name] = {"files": parquet_parts(d)}
        elif "files" in d:  # {"files", "bias": False (ignore its bias column), "where": a boolean column}
            sources[name] = d
        else:  # arrays: x, y[, a, g]
            sources[name] = {"files": write_parts(inputs / name, d)}
    used = {p["data"] for p in phases} | {"val"}
    data = {name: [sources[part] for part in name.split("+")] for name in used}  # "train+synthetic": a union
    sizes = {name: sum(count_rows(**m) for m in members) for name, members in data.items()}
    loop_config = {
        "method": method, "seed": cfg.seed, "phases": phases, "batch_size": tc.batch_size, "lr": tc.lr,
        "weight_decay": tc.weight_decay, "augment": tc.augment, "groupdro_eta": tc.groupdro_eta,
        "select_by": select_by, "classifier": cfg.models.classifier.model_dump(),
        "num_classes": info["num_classes"], "num_bias": num_bias, "threads": tc.cpus_per_worker,
        "data": data, "image_size": size, "shuffle_buffer": max(tc.batch_size, buffer_rows(tc.shuffle_buffer_mb, size)),
    }
    resources = {"CPU": tc.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.ray.num_gpus_per_worker
    storage = ctx.run_dir / "stages" / "train" / "_ray"
    run_name = keyed_train_run(storage, method.replace("/", "_"), getattr(ctx, "node_key", None))
    mode = f"{tc.num_workers} worker(s)" if tc.num_workers else "local mode (one Ray task)"
    ctx.log(f"[train/{method}] Ray Train, {mode} × {resources}, phases "
            + ", ".join(f"{p['name']}×{p['epochs']} on {p['data']} ({sizes[p['data']]} rows)" for p in phases)
            + f"; select by val {select_by}")
    ckpt = fit_torch(train_loop, loop_config, num_workers=tc.num_workers, resources=resources, storage=storage,
                     name=run_name, max_failures=tc.max_failures)
    if ckpt is None:
        raise RuntimeError(f"train/{method}: no checkpoint was reported")
    with ckpt.as_directory() as d:
        state = json.loads(Path(f"{d}/state.json").read_text())
        with atomic_path(out / "model.safetensors") as tmp:
            shutil.copyfile(f"{d}/best.safetensors", tmp)
    meta = {
        "method": method,
        "classifier": cfg.models.classifier.model_dump(),
        "num_classes": info["num_classes"],
        "class_names": info["class_names"],
        "image_size": size,
        "normalization": {"mean": 0.5, "std": 0.5, "range": "[-1, 1]"},
        "select_by": select_by,
        "best_epoch": state["best_epoch"] + 1,
        "best_phase": state["best_phase"],
        "best_val_score": state["best_score"] if math.isfinite(state["best_score"]) else None,
        "phases": [{k: p[k] for k in ("name", "data", "epochs")} for p in phases],
        **(summary or {}),
    }
    atomic_write_json(out / "meta.json", meta)
    remove_path(storage / run_name)  # Ray Train's copies; the selected model stays
    remove_path(inputs)
    if any(p.get("select") for p in phases):
        ctx.log(f"[train/{method}] best epoch {meta['best_epoch']} of {len(phases)} phase(s), in {meta['best_phase']} "
                f"(val {select_by} {state['best_score']:.3f})")
    else:
        ctx.log(f"[train/{method}] kept the last epoch ({meta['best_epoch']}; no val selection)")
    return StageResult([ctx.rel(out / "model.safetensors"), ctx.rel(out / "meta.json")],
                       {"best_epoch": meta["best_epoch"], "best_phase": meta["best_phase"],
                        "best_val_score": meta["best_val_score"], "select_by": select_by})


def run_train(ctx, method: str):
    """ERM / GroupDRO on the real training split."""
    info = ctx.data_info
    if method == "groupdro" and (info["num_bias"] is None
                                 or sum(map(sum, info["group_counts"]["train"])) < info["counts"]["train"]):
        raise ValueError("groupdro needs `bias` labels on every training row; the train split has rows without one")
    return fit_classifier(ctx, method, baseline_phases(method, ctx.cfg.train.epochs))


def fit_augmented(ctx, method: str, synthetic: str | Path, where: str | None = None):
    """ERM on the real training split ∪ a labelled synthetic Parquet set (``pixels``, ``label``; the rows whose
    boolean column ``where`` is true): DiffInject's and GAMMA-FACE's retraining. Synthetic rows carry no bias
    label; val selects the epoch. The workers stream both sets."""
    syn = {"files": parquet_parts(synthetic), "bias": False, "where": where}
    phases = [{"name": "erm_augmented", "data": "train+synthetic", "recipe": "erm", "epochs": ctx.cfg.train.epochs,
               "sampler": "uniform", "select": True}]
    return fit_classifier(ctx, method, phases, extra_data={"synthetic": syn},
                          summary={"synthetic": count_rows(**syn), "real": ctx.data_info["counts"]["train"]})
