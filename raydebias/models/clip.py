"""CLIP for embedding and filtering: open_clip models (pretrained weights or a tiny bootstrap arch trained in-run),
an open_clip-compatible ``CLIPTokenizer`` for diffusers, safetensors save/load and captions from labels.

Nothing here downloads from a hub unless ``source="pretrained"`` names a remote open_clip tag.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import get_model_preprocess_cfg, set_model_preprocess_cfg
from transformers import CLIPTokenizer

from raydebias._internal.io import (
    as_path,
    atomic_write_json,
    atomic_write_text,
    load_safetensors,
    save_weights,
    sha256_json,
)
from raydebias.config import ClipModelConfig

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
SOT, EOT = "<start_of_text>", "<end_of_text>"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "clip.json"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Cache directory
# ---------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$RAYDEBIAS_CACHE_DIR`` if set, else a per-user folder under the system temp dir."""
    env = os.environ.get("RAYDEBIAS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"raydebias-cache-{uid}"


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer (open_clip's BPE as a transformers CLIPTokenizer)
# ---------------------------------------------------------------------------------------------------------------


def _open_clip_bpe() -> tuple[list[str], list[tuple[str, str]]]:
    """open_clip's vocabulary (49,408 tokens, ids in open_clip order) and BPE merges."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + [SOT, EOT]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return vocab, merges  # type: ignore[return-value]


def write_tokenizer_files(out_dir: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (open_clip's BPE) into ``out_dir``; a no-op when both exist.

    Each file is written to a temp sibling and renamed, so concurrent writers never leave a partial file.
    """
    out = Path(out_dir)
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    if vocab_path.is_file() and merges_path.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _open_clip_bpe()
    atomic_write_text(merges_path, "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    atomic_write_text(vocab_path, json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    return out


def clip_tokenizer(cache_dir: str | Path | None = None) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose ids equal ``open_clip.tokenize`` (for text without HTML entities / literal
    ``<start_of_text>``-style markers, which open_clip unescapes / keeps special): pad ``"!"`` = id 0 (open_clip's
    zero padding), ``model_max_length=77``; truncation keeps sot + 75 tokens + eot, like open_clip.

    ``split_special_tokens=True`` keeps a literal ``!`` in the text from being read as the pad token; it is
    saved by ``save_pretrained`` so ``CLIPTokenizer.from_pretrained`` (diffusers pipelines) behaves the same.
    Files are cached in ``cache_dir`` (default: ``default_cache_dir() / "clip-tokenizer"``).
    """
    d = write_tokenizer_files(Path(cache_dir) if cache_dir is not None else default_cache_dir() / "clip-tokenizer")
    with open(d / "vocab.json", encoding="utf-8") as f:
        vocab = json.load(f)
    with open(d / "merges.txt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line]
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=SOT,
        eos_token=EOT,
        pad_token="!",
        unk_token=EOT,
        model_max_length=CONTEXT_LENGTH,
        split_special_tokens=True,
    )


# ---------------------------------------------------------------------------------------------------------------
# Model configs
# ---------------------------------------------------------------------------------------------------------------


def _heads(width: int) -> int:
    """``max(1, width // 32)`` lowered to a divisor of ``width`` (attention needs ``width % heads == 0``)."""
    h = max(1, width // 32)
    while width % h:
        h -= 1
    return h


def tiny_model_config(cfg: ClipModelConfig, image_size: int) -> dict[str, Any]:
    """The open_clip model config (``embed_dim``/``vision_cfg``/``text_cfg``) of the bootstrap arch."""
    heads = _heads(cfg.width)
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": int(image_size),
            "layers": cfg.layers,
            "width": cfg.width,
            "head_width": cfg.width // heads,
            "patch_size": cfg.patch_size,
        },
        "text_cfg": {
            "context_length": CONTEXT_LENGTH,
            "vocab_size": VOCAB_SIZE,
            "width": cfg.width,
            "heads": heads,
            "layers": cfg.layers,
        },
    }


def _register(name: str, model_cfg: dict[str, Any]) -> str:
    """Make ``name`` an open_clip arch with ``model_cfg`` (writes ``<cache>/open_clip_configs/<name>.json``)."""
    if open_clip.get_model_config(name) == model_cfg:
        return name
    path = default_cache_dir() / "open_clip_configs" / f"{name}.json"
    atomic_write_json(path, model_cfg)
    open_clip.add_model_config(path)
    if open_clip.get_model_config(name) != model_cfg:
        raise RuntimeError(f"open_clip did not register {name} from {path}")
    return name


def register_tiny_clip(cfg: ClipModelConfig, image_size: int) -> str:
    """Register the bootstrap arch with open_clip; returns its name ``raydebias-tiny-<config hash>``."""
    model_cfg = tiny_model_config(cfg, image_size)
    return _register(f"raydebias-tiny-{sha256_json(model_cfg)[:12]}", model_cfg)


# ---------------------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------------------


def _as_size(s: Any) -> tuple[int, int]:
    return (int(s[0]), int(s[1])) if isinstance(s, (tuple, list)) else (int(s), int(s))


class ClipEncoder:
    """An open_clip model and its tokenizer: L2-normalised image/text embeddings, safetensors save/load."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        name: str,
        source: str,
        model_cfg: dict[str, Any],
        pretrained: str | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.model_cfg = model_cfg
        self.pretrained = pretrained
        pp = get_model_preprocess_cfg(model)
        self.preprocess_cfg: dict[str, Any] = dict(pp)
        self.image_size = _as_size(getattr(model.visual, "image_size", None) or pp["size"])
        self.mean = torch.tensor(pp.get("mean", open_clip.OPENAI_DATASET_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(pp.get("std", open_clip.OPENAI_DATASET_STD), dtype=torch.float32).view(1, 3, 1, 1)
        interp = pp.get("interpolation", "bicubic")
        self.interpolation = interp if interp in ("bilinear", "bicubic") else "bilinear"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    def to(self, device: str | torch.device) -> "ClipEncoder":
        self.model.to(device)
        return self

    def preprocess(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 NHWC (or HWC) RGB → normalised float NCHW at the model's image size, on the model's device."""
        x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.asarray(pixels))
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 NHWC RGB pixels, got shape {tuple(x.shape)}")
        x = x.to(self.device).permute(0, 3, 1, 2).float() / 255.0
        if tuple(x.shape[-2:]) != self.image_size:
            down = x.shape[-2] > self.image_size[0] or x.shape[-1] > self.image_size[1]
            x = F.interpolate(x, size=self.image_size, mode=self.interpolation, align_corners=False, antialias=down)
            x = x.clamp_(0.0, 1.0)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    @torch.inference_mode()
    def encode_images(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, H, W, 3) uint8 → (N, embed_dim) float32, L2-normalised."""
        self.model.eval()
        if np.ndim(pixels) == 3:
            pixels = pixels[None]
        out = [
            self.model.encode_image(self.preprocess(pixels[i : i + batch_size]), normalize=True).float().cpu()
            for i in range(0, len(pixels), batch_size)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, self.embed_dim), np.float32)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Captions → (N, embed_dim) float32, L2-normalised."""
        self.model.eval()
        texts = list(texts)
        out = [
            self.model.encode_text(self.tokenize(texts[i : i + batch_size]), normalize=True).float().cpu()
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, self.embed_dim), np.float32)

    # ---- persistence ------------------------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        """Write ``model.safetensors`` and ``clip.json`` (name, source, pretrained, open_clip model config,
        preprocess config) into ``out_dir``; the JSON is written last, so its presence marks a complete save."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # clone: open_clip ties some tensors, and safetensors refuses shared storage
        save_weights(out / WEIGHTS_FILE, {k: v.clone() for k, v in self.model.state_dict().items()},
                     metadata={"format": "pt"})
        meta = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "source": self.source,
            "pretrained": self.pretrained,
            "model_cfg": self.model_cfg,
            "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in self.preprocess_cfg.items()},
        }
        atomic_write_json(out / META_FILE, meta)
        return out

    @classmethod
    def load(cls, in_dir: str | Path, device: str | torch.device = "cpu") -> "ClipEncoder":
        """Rebuild a saved encoder from its safetensors weights and JSON (no pickle, no download)."""
        d = as_path(in_dir)
        meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{d / META_FILE}: unsupported format_version {meta.get('format_version')!r}")
        model_cfg = meta["model_cfg"]
        name = meta["name"]
        if ":" in name or open_clip.get_model_config(name) != model_cfg:
            name = _register(
                name if name.startswith("raydebias-tiny-") else f"raydebias-saved-{sha256_json(model_cfg)[:12]}",
                model_cfg,
            )
        model = open_clip.create_model(name, pretrained=None, pretrained_text=False, device=device)
        model.load_state_dict(load_safetensors(d / WEIGHTS_FILE, device=str(device)), strict=True)
        pp = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocess_cfg"].items()}
        set_model_preprocess_cfg(model, pp)
        return cls(
            model,
            open_clip.get_tokenizer(name),
            name=name,
            source=meta["source"],
            model_cfg=model_cfg,
            pretrained=meta.get("pretrained"),
        )


def create_clip(
    cfg: ClipModelConfig,
    source: str,
    image_size: int,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> ClipEncoder:
    """``source="pretrained"``: ``cfg.arch`` with ``cfg.pretrained`` weights (an open_clip tag or a local checkpoint
    file; ``image_size`` is ignored, images are resized to the model's size). ``"bootstrap"``: the tiny registered
    arch at ``image_size``, randomly initialised from ``seed``."""
    if source == "pretrained":
        if not cfg.pretrained:
            raise ValueError("models.clip.pretrained must be set (an open_clip tag, a checkpoint file or a folder)")
        arch, weights = cfg.arch, cfg.pretrained
        folder = Path(weights).expanduser()
        if folder.is_dir():  # an open_clip folder (the hub layout): open_clip_config.json + safetensors weights
            if not any(folder.glob("*.safetensors")):
                raise ValueError(f"models.clip.pretrained: {folder} has no .safetensors weights (pickled "
                                 f"checkpoints are not loaded)")
            arch, weights = f"local-dir:{folder}", None
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=weights, device=device)
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise ValueError(f"open_clip has no model config for {arch!r}")
        return ClipEncoder(model, open_clip.get_tokenizer(arch), name=arch, source=source,
                           model_cfg=model_cfg, pretrained=cfg.pretrained)
    if source == "bootstrap":
        name = register_tiny_clip(cfg, image_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _, _ = open_clip.create_model_and_transforms(name, pretrained=None, device=device)
        return ClipEncoder(model, open_clip.get_tokenizer(name), name=name, source=source,
                           model_cfg=open_clip.get_model_config(name))
    raise ValueError(f"unknown CLIP source {source!r} (expected 'pretrained' or 'bootstrap')")


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap training
# ---------------------------------------------------------------------------------------------------------------


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (edge-replicated padding)."""
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    p = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])[:, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return p[bi, ci, rows, cols]


def _contrastive_step(encoder: ClipEncoder, images: torch.Tensor, tokens: torch.Tensor, cap_idx: torch.Tensor,
                      loss_fn: torch.nn.Module) -> torch.Tensor:
    model = encoder.model
    img = model.encode_image(images, normalize=True)
    # Encode each distinct caption once and gather: same loss and gradients, far less text-tower work.
    uniq, inv = torch.unique(cap_idx, return_inverse=True)
    txt = model.encode_text(tokens[uniq], normalize=True)[inv]
    return loss_fn(img, txt, model.logit_scale.exp())


def clip_loss(encoder: ClipEncoder, pixels: np.ndarray, captions: Sequence[str]) -> float:
    """open_clip's ``ClipLoss`` on one batch (no augmentation, no gradient)."""
    caps = list(captions)
    uniq = sorted(set(caps))
    pos = {c: i for i, c in enumerate(uniq)}
    tokens = encoder.tokenize(uniq)
    idx = torch.tensor([pos[c] for c in caps], device=encoder.device)
    encoder.model.eval()
    with torch.inference_mode():
        return float(_contrastive_step(encoder, encoder.preprocess(pixels), tokens, idx, open_clip.ClipLoss()))


def array_batches(pixels: np.ndarray, batch_size: int, gen: torch.Generator) -> Iterator[tuple[np.ndarray, Any]]:
    """Endless ``(row indices, images)`` batches of ``batch_size`` rows from an in-memory array: a fresh seeded
    permutation whenever the current one has fewer than ``batch_size`` rows left."""
    px = torch.from_numpy(np.ascontiguousarray(pixels))
    n = len(px)
    perm, cursor = torch.randperm(n, generator=gen), 0
    while True:
        if cursor + batch_size > n:
            perm, cursor = torch.randperm(n, generator=gen), 0
        idx = perm[cursor : cursor + batch_size]
        cursor += batch_size
        yield idx.numpy(), px[idx]


def train_bootstrap_clip(
    encoder: ClipEncoder,
    pixels: np.ndarray | Callable[[int], Iterator[tuple[np.ndarray, Any]]],
    captions: Sequence[str],
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    log: Callable[[str], Any] | None = print,
    max_shift: int | None = None,
) -> dict[str, float]:
    """Contrastive training (open_clip ``ClipLoss``, learnable logit scale, AdamW with warmup + cosine decay,
    random shifts of up to ``max_shift`` px, default ~1/16 of the image side) on (image, caption) pairs.

    ``pixels``: the images as one uint8 NHWC array, or a function ``batch_size → endless iterator of (row indices,
    images)`` that streams them (``captions[i]`` is row i's caption either way).

    Returns ``loss_first``/``loss_last`` (mean loss over the first/last ``k = clip(steps // 10, 1, 10)`` steps),
    ``steps`` and ``seconds``.
    """
    n = len(captions)
    if not callable(pixels) and len(pixels) != n:
        raise ValueError(f"{len(pixels)} images but {n} captions")
    if n < 2:
        raise ValueError("contrastive training needs at least 2 images")
    model = encoder.model
    dev = encoder.device
    gen = torch.Generator().manual_seed(seed)
    uniq = sorted(set(captions))
    pos = {c: i for i, c in enumerate(uniq)}
    tokens = encoder.tokenize(uniq)
    cap_idx = torch.tensor([pos[c] for c in captions], dtype=torch.long)
    bs = min(batch_size, n)
    batches = pixels(bs) if callable(pixels) else array_batches(pixels, bs, gen)
    shift = max(1, encoder.image_size[0] // 16) if max_shift is None else max_shift

    decay = [p for nm, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in nm]
    no_decay = [p for nm, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in nm)]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # the fused kernel is ~7x faster on CPU (the 49,408-row token embedding dominates the update)
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 20)

    def lr_factor(s: int) -> float:  # linear warmup, then cosine decay to 0
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    loss_fn = open_clip.ClipLoss()
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    try:
        for step in range(steps):
            idx, x = next(batches)
            images = _random_shift(encoder.preprocess(torch.as_tensor(x)), shift, gen)
            loss = _contrastive_step(encoder, images, tokens, cap_idx[torch.as_tensor(idx)].to(dev), loss_fn)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(float(loss.detach()))
            if log is not None and (step == 0 or (step + 1) % max(1, steps // 10) == 0):
                log(f"clip step {step + 1}/{steps} loss {losses[-1]:.4f} scale {model.logit_scale.exp().item():.1f}")
    finally:
        model.eval()
    k = min(10, max(1, steps // 10))
    return {
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "steps": steps,
        "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------


def captions_for(
    labels: Sequence[int],
    bias: Sequence[int] | None,
    class_names: Sequence[str],
    bias_names: Sequence[str] | None,
    template: str = "a photo of a {bias} {class}",
) -> list[str]:
    """One caption per row: ``template`` with ``{class}``/``{bias}`` filled from the names; ``bias=None`` drops
    ``{bias}`` (and the space after it) from the template."""
    labels = [int(v) for v in labels]
    for v in labels:
        if not 0 <= v < len(class_names):
            raise ValueError(f"label {v} out of range for {len(class_names)} class names")
    if bias is None:
        t = template.replace("{bias} ", "").replace("{bias}", "")
        return [" ".join(t.replace("{class}", class_names[y]).split()) for y in labels]
    bias = [int(v) for v in bias]
    if bias_names is None:
        raise ValueError("bias_names are needed when bias is given")
    if len(bias) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(bias)} bias values")
    for v in bias:
        if not 0 <= v < len(bias_names):
            raise ValueError(f"bias {v} out of range for {len(bias_names)} bias names")
    return [template.replace("{class}", class_names[y]).replace("{bias}", bias_names[b]) for y, b in zip(labels, bias)]
