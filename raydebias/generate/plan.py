"""What to fine-tune and what to generate for a "Harnessing diffusion" variant (pure functions, no models).

* ``vanilla``: no adapters; prompt "a photo of a {bias} {class}".
* ``lora``: one LoRA per group, trained on l = min eligible group size images with the group's description.
* ``dreambooth``: one DreamBooth-LoRA per group ("a photo of a [V] {class}", up to 100 images).
* ``clustered_dreambooth``: one DreamBooth-LoRA per CLIP cluster of each group; M / k_D images per cluster.

A group with fewer than ``min_images`` real images gets no model of its own (severe-bias mode): it is generated
by the model(s) of the *aligned* group of the same class (the class's most frequent bias value), prompted with the
target group's description and without the [V] token — it never trains on the conflicting group's images.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np

DREAMBOOTH_MAX_IMAGES = 100


@dataclass
class Unit:
    """One adapter to fine-tune."""

    name: str
    y: int
    a: int
    cluster: int
    prompt: str
    ids: list[str] = field(default_factory=list)


@dataclass
class Row:
    """One image to generate; ``row_id`` is stable so that generation resumes exactly."""

    row_id: str
    y: int
    a: int
    cluster: int
    adapter: str | None
    prompt: str
    seed: int
    transferred: bool
    partial_prompt: str = ""  # the prompt without the class word (compositional guidance)

    def as_dict(self) -> dict:
        return asdict(self)


def describe(template: str, class_name: str, bias_name: str | None) -> str:
    text = template.replace("{bias} ", "") if bias_name is None else template.replace("{bias}", bias_name)
    return " ".join(text.replace("{class}", class_name).split())


def dreambooth_prompt(template: str, identifier: str, class_name: str, bias_name: str | None) -> str:
    """The group's description with the [V] token before the class: "a photo of a red sks digit 0".

    The paper's prompt is "a photo of a [V] {class}". The bootstrap base model is trained on half group-balanced
    batches, so the class word alone no longer implies the aligned bias value, and 20 LoRA steps do not teach [V]
    it: with the paper's prompt, the aligned groups' samples had the right bias 16 % of the time (BENCHMARKS.md,
    "Generation fidelity: findings"); the bias word keeps it.
    """
    return describe(template, f"{identifier} {class_name}", bias_name)


def row_seed(seed: int, row_id: str) -> int:
    return int(hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()[:8], 16)


def plan_units(variant: str, ids: np.ndarray, y: np.ndarray, a: np.ndarray, clusters: np.ndarray,
               class_names: list[str], bias_names: list[str], template: str, identifier: str, min_images: int,
               rng_seed: int = 0) -> list[Unit]:
    """Adapters for ``variant`` (empty for vanilla)."""
    if variant == "vanilla":
        return []
    rng = np.random.default_rng(rng_seed)
    B = len(bias_names)
    groups = y * B + a
    sizes = {int(g): int((groups == g).sum()) for g in np.unique(groups)}
    eligible = sorted(g for g, n in sizes.items() if n >= min_images)
    l_min = min((sizes[g] for g in eligible), default=0)
    units = []
    for g in eligible:
        yy, aa = divmod(g, B)
        idx = np.flatnonzero(groups == g)
        if variant == "lora":
            pick = rng.choice(idx, size=l_min, replace=False) if len(idx) > l_min else idx
            units.append(Unit(f"g{yy}_{aa}", yy, aa, 0, describe(template, class_names[yy], bias_names[aa]),
                              sorted(ids[pick].tolist())))
            continue
        prompt = dreambooth_prompt(template, identifier, class_names[yy], bias_names[aa])
        if variant == "dreambooth":
            pick = rng.choice(idx, size=DREAMBOOTH_MAX_IMAGES, replace=False) if len(idx) > DREAMBOOTH_MAX_IMAGES else idx
            units.append(Unit(f"g{yy}_{aa}", yy, aa, 0, prompt, sorted(ids[pick].tolist())))
            continue
        for c in np.unique(clusters[idx]):  # clustered_dreambooth
            members = idx[clusters[idx] == c]
            units.append(Unit(f"g{yy}_{aa}_c{int(c)}", yy, aa, int(c), prompt, sorted(ids[members].tolist())))
    return units


def aligned_bias(y: np.ndarray, a: np.ndarray, num_classes: int, num_bias: int) -> np.ndarray:
    """The most frequent bias value of each class in train (-1 for a class with no images)."""
    counts = np.zeros((num_classes, num_bias), dtype=np.int64)
    np.add.at(counts, (y, a), 1)
    return np.where(counts.sum(1) > 0, counts.argmax(1), -1)


def plan_rows(variant: str, units: list[Unit], y: np.ndarray, a: np.ndarray, class_names: list[str],
              bias_names: list[str], template: str, identifier: str, images_per_group: int, seed: int) -> list[Row]:
    """M images for every (y, a) group — including groups with no real image at all."""
    C, B = len(class_names), len(bias_names)
    by_group: dict[tuple[int, int], list[Unit]] = {}
    for u in units:
        by_group.setdefault((u.y, u.a), []).append(u)
    align = aligned_bias(y, a, C, B)
    rows = []
    for yy in range(C):
        for aa in range(B):
            target = describe(template, class_names[yy], bias_names[aa])
            own = by_group.get((yy, aa))
            if variant == "vanilla":
                sources, prompt, transferred = [None], target, False
            elif own:
                sources = [u.name for u in own]
                prompt = target if variant == "lora" else dreambooth_prompt(template, identifier, class_names[yy],
                                                                             bias_names[aa])
                transferred = False
            else:  # severe-bias transfer from the aligned group of the same class
                donor = by_group.get((yy, int(align[yy])), [])
                sources = [u.name for u in donor] or [None]
                prompt, transferred = target, True
            partial = describe(template, "" if prompt == target else identifier, bias_names[aa])
            per = np.full(len(sources), images_per_group // len(sources))
            per[: images_per_group % len(sources)] += 1
            for c, (src, n) in enumerate(zip(sources, per)):
                for j in range(int(n)):
                    rid = f"{variant}:{yy},{aa}:{c}:{j}"
                    rows.append(Row(rid, yy, aa, c, src, prompt, row_seed(seed, rid), transferred, partial))
    return rows
