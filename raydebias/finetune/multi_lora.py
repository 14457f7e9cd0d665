"""Many LoRA adapters trained in one batched pass (Punica / S-LoRA style routing, written here because peft's
mixed-adapter batches, ``adapter_names=``, refuse training mode).

The LoRA weights of N peft adapters are stacked into ``A`` (N, r, in) and ``B`` (N, out, r) per targeted layer;
each row of a batch that mixes adapters is routed to its own (gather + batched matmul), so one forward and one
backward serve all N. Each adapter draws its batch, timesteps and noise from its own generators, its loss is its
own batch mean (the batch loss is their sum), its gradient is clipped by its own norm and AdamW keeps its moments
elementwise: each adapter receives the update :func:`~raydebias.finetune.dreambooth_lora.train_lora` would give it
alone, to float tolerance (tests/finetune/test_multi_lora.py). The trained weights are copied back into the peft
adapters, so :func:`~raydebias.finetune.dreambooth_lora.save_lora` writes the usual diffusers LoRA per adapter.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch

from raydebias.finetune.dreambooth_lora import _encode_all, adapter_names, add_lora, set_active
from raydebias.models.diffusion import DiffusionBundle, diffusion_loss
from raydebias.models.sampling import sample


class RoutedLoRA:
    """Stacked, trainable copies of the adapters ``names`` on every peft LoRA layer of ``unet``; inside
    :meth:`routing` each forward adds, for row i, ``scale_k · B_k A_k x_i`` with k = ``route[i]`` (a batch that is
    a whole multiple of the route, as classifier-free guidance makes, repeats it)."""

    def __init__(self, unet: torch.nn.Module, names: list[str], base_slot: bool = False):
        """``base_slot`` appends an all-zero adapter: rows routed to ``-1`` get the base UNet (inference)."""
        from peft.tuners.lora import LoraLayer

        self.names = list(names)
        self.layers: list[tuple[torch.nn.Module, torch.nn.Parameter, torch.nn.Parameter, torch.Tensor]] = []
        for m in unet.modules():
            if isinstance(m, LoraLayer) and all(n in m.lora_A for n in self.names):
                a = torch.stack([m.lora_A[n].weight.detach().float() for n in self.names])
                b = torch.stack([m.lora_B[n].weight.detach().float() for n in self.names])
                scale = torch.tensor([float(m.scaling[n]) for n in self.names] + ([0.0] if base_slot else []))
                if base_slot:
                    a, b = torch.cat([a, torch.zeros_like(a[:1])]), torch.cat([b, torch.zeros_like(b[:1])])
                self.layers.append((m, torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone()), scale))
        if not self.layers:
            raise RuntimeError(f"no LoRA layer carries all of {self.names}")
        self.route: torch.Tensor | None = None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, a, b, _ in self.layers for p in (a, b)]

    def _hook(self, a: torch.nn.Parameter, b: torch.nn.Parameter, scale: torch.Tensor):
        def hook(module, args, output):
            x = args[0]
            flat = x.dim() == 2
            xs = (x.unsqueeze(1) if flat else x).float()
            k = self.route
            if xs.shape[0] != len(k):  # classifier-free guidance runs [uncond; cond] (or 3 ways): the same rows
                k = k.repeat(xs.shape[0] // len(k))
            delta = torch.bmm(torch.bmm(xs, a[k].transpose(1, 2)), b[k].transpose(1, 2))
            delta = delta * scale.to(delta)[k].view(-1, 1, 1)
            return output + (delta.squeeze(1) if flat else delta).to(output.dtype)

        return hook

    @contextmanager
    def routing(self, unet: torch.nn.Module):
        """peft's own adapters off, the routed stacks on (for the duration of the block)."""
        unet.disable_adapters()
        handles = [m.register_forward_hook(self._hook(a, b, s)) for m, a, b, s in self.layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            unet.enable_adapters()

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the trained stacks into the peft adapters (their own dtype)."""
        for m, a, b, _ in self.layers:
            for k, n in enumerate(self.names):
                m.lora_A[n].weight.copy_(a[k].to(m.lora_A[n].weight.dtype))
                m.lora_B[n].weight.copy_(b[k].to(m.lora_B[n].weight.dtype))

    @torch.no_grad()
    def clip_per_adapter(self, max_norm: float = 1.0) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` applied to each adapter's slice separately; returns the norms."""
        sq = torch.zeros(len(self.names), dtype=torch.float64)
        for p in self.parameters():
            if p.grad is not None:
                sq += p.grad.flatten(1).double().square().sum(1)
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0).float()
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.view(-1, *([1] * (p.grad.dim() - 1))))
        return norm


def train_loras_batched(
    bundle: DiffusionBundle,
    jobs: list[dict],
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    rank: int = 4,
) -> list[dict]:
    """Train one adapter per job — ``{"name", "pixels" (uint8 NHWC), "prompts", "seed"}`` — for ``steps`` steps in
    batches that mix all of them (``batch_size`` rows per adapter), as :func:`train_lora` would one at a time
    (no prior preservation here: that path stays sequential). Returns one stats dict per job."""
    if not jobs or steps <= 0:
        raise ValueError("need at least one adapter and one step")
    names = [j["name"] for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be unique: {names}")
    unet = bundle.unet
    for j in jobs:
        if len(j["pixels"]) != len(j["prompts"]) or len(j["pixels"]) == 0:
            raise ValueError(f"adapter {j['name']!r}: needs as many prompts as images, and at least one image")
        if j["name"] not in adapter_names(bundle):
            torch.manual_seed(j["seed"])  # the same initial lora_A as train_lora gives this adapter
            add_lora(unet, j["name"], rank=rank)
    for m in (unet, bundle.text_encoder, bundle.vae):
        if m is not None:
            m.requires_grad_(False)
    routed = RoutedLoRA(unet, names)
    params = routed.parameters()
    for p in params:
        p.requires_grad_(True)

    rngs = [np.random.default_rng(j["seed"]) for j in jobs]
    gens = [torch.Generator().manual_seed(j["seed"]) for j in jobs]
    latents = [_encode_all(bundle, j["pixels"]) for j in jobs]
    uniq = list(dict.fromkeys(p for j in jobs for p in j["prompts"]))
    with torch.no_grad():
        table = bundle.embed_prompts(uniq).to(bundle.dtype)
    row = {p: i for i, p in enumerate(uniq)}
    ids = [torch.tensor([row[p] for p in j["prompts"]]) for j in jobs]
    sizes = [min(batch_size, len(j["pixels"])) for j in jobs]
    route = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(sizes)]).to(bundle.device)
    total = int(sum(sizes))
    # mean_i(w_i · mse_i) over the mixed batch with w_i = total / n_k is Σ_k (adapter k's batch mean)
    weights = torch.cat([torch.full((n,), total / n) for n in sizes])
    num_t = bundle.noise_scheduler.config.num_train_timesteps
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    losses = np.zeros((steps, len(jobs)))
    unet.train()
    t0 = time.perf_counter()
    try:
        with routed.routing(unet):
            routed.route = route
            for step in range(steps):
                zs, embs, ts, noises = [], [], [], []
                for k in range(len(jobs)):  # the draws train_lora makes, in its order, per adapter
                    idx = torch.from_numpy(rngs[k].integers(0, len(latents[k]), size=sizes[k]))
                    z = latents[k][idx]
                    zs.append(z)
                    embs.append(table[ids[k][idx]])
                    ts.append(torch.randint(0, num_t, (sizes[k],), generator=gens[k]))
                    noises.append(torch.randn(z.shape, generator=gens[k], dtype=torch.float32))
                per = diffusion_loss(bundle, torch.cat(zs), torch.cat(embs), timesteps=torch.cat(ts),
                                     noise=torch.cat(noises), weights=weights, reduction="none")
                opt.zero_grad(set_to_none=True)
                per.mean().backward()
                routed.clip_per_adapter(1.0)
                opt.step()
                with torch.no_grad():
                    losses[step] = [float(part.mean()) / (total / n) for part, n in
                                    zip(per.detach().split(sizes), sizes)]
    finally:
        unet.eval()
        for p in params:
            p.requires_grad_(False)
    secs = time.perf_counter() - t0
    routed.write_back()
    set_active(bundle, [names[-1]])
    k = max(1, steps // 10)
    per_adapter = int(sum(p[0].numel() for p in params))
    return [{"adapter": j["name"], "steps": steps, "batch_size": sizes[i], "trainable_params": per_adapter,
             "loss_first": float(losses[:k, i].mean()), "loss_last": float(losses[-k:, i].mean()),
             "seconds": secs, "adapters_in_batch": len(jobs), "it_per_s": steps / secs if secs > 0 else float("inf")}
            for i, j in enumerate(jobs)]


@torch.no_grad()
def sample_mixed(bundle: DiffusionBundle, adapters: list[str | None], prompts: list[str], seeds: list[int],
                 **sample_kwargs) -> np.ndarray:
    """Sample one batch whose rows use different (already loaded) adapters — ``None`` = the base model — in one
    pass: the same images as activating each adapter for its own rows (:func:`~raydebias.models.diffusion.sample`
    draws each row's noise from its seed, and every layer acts row by row)."""
    names = sorted({a for a in adapters if a})
    if not names:
        set_active(bundle, None)
        return sample(bundle, prompts, seeds=seeds, batch_size=max(1, len(prompts)), **sample_kwargs)
    routed = RoutedLoRA(bundle.unet, names, base_slot=True)
    slot = {n: i for i, n in enumerate(names)}
    with routed.routing(bundle.unet):
        routed.route = torch.tensor([slot[a] if a else -1 for a in adapters], device=bundle.device)
        return sample(bundle, prompts, seeds=seeds, batch_size=max(1, len(prompts)), **sample_kwargs)
