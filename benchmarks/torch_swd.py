"""The SwD reference algorithm in PyTorch on diffusers' SD3Transformer2DModel + peft LoRA, for speed comparisons.

Written for the benchmarks after the structure of yandex-research/swd (`src/losses.py`, `train.py`,
`src/utils/prepare_utils.py`), not copied: two model copies (student = base + LoRA, whose adapter is switched
off to act as the teacher; fake = a deep copy of the base + its own LoRA + the classifier head), and each loss
term its own forward pass as the reference runs them:
- fake update: student (no grad) -> fake with features (grad) -> fake on real data, features only;
- generator update: student (grad) -> teacher cond, teacher uncond (no grad) -> fake (no grad, for DMD) ->
  fake features (frozen, grad to the input, GAN) -> fake features on fake and real (PDM).
Latents are NCHW here. Sigmas come from our diffusers-exact grid (`swd_jax.method.schedule`).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out",
                "net.0.proj", "net.2"]


def sd3_forward(model, x_BCHW, context, pooled, timestep_B, feature_blocks: Sequence[int] = (),
                features_only: bool = False):
    """SD3Transformer2DModel forward that also returns the image tokens after `feature_blocks` (0-based).

    features_only: stop after the last feature block and return the list of features (the reference's
    `return_only_features=True`); otherwise return (velocity NCHW, features).
    """
    m = model
    H, W = x_BCHW.shape[-2:]
    x = m.pos_embed(x_BCHW)
    temb = m.time_text_embed(timestep_B, pooled)
    c = m.context_embedder(context)
    feats = []
    for i, block in enumerate(m.transformer_blocks):
        if torch.is_grad_enabled() and m.gradient_checkpointing:
            c, x = torch.utils.checkpoint.checkpoint(block, x, c, temb, use_reentrant=False)
        else:
            c, x = block(hidden_states=x, encoder_hidden_states=c, temb=temb)
        if i in feature_blocks:
            feats.append(x)
            if features_only and i == max(feature_blocks):
                return feats
    y = m.proj_out(m.norm_out(x, temb))
    p, C = m.config.patch_size, m.out_channels
    y = y.reshape(y.shape[0], H // p, W // p, p, p, C)
    v = torch.einsum("nhwpqc->nchpwq", y).reshape(y.shape[0], C, H, W)
    return v, feats


def discriminator_head(width: int, num_layers: int = 4) -> torch.nn.Sequential:
    """[LayerNorm, GELU, Linear] x num_layers, widths linspace(width, 1) (the reference's `cls_pred_branch`)."""
    dims = torch.linspace(width, 1, num_layers + 1, dtype=int).tolist()
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.LayerNorm(a), torch.nn.GELU(), torch.nn.Linear(a, b))
                                 for a, b in zip(dims[:-1], dims[1:])])


def gan_loss(head, feats_fake, feats_real=None):
    """softplus(D_fake) + softplus(-D_real) for the discriminator, softplus(-D_fake) for the generator."""
    logits_fake = sum(head(f.float().mean(dim=1)) for f in feats_fake) / len(feats_fake)
    if feats_real is None:
        return F.softplus(-logits_fake).mean()
    logits_real = sum(head(f.float().mean(dim=1)) for f in feats_real) / len(feats_real)
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def pdm_linear(x, y, c: float = 1e-3, eps: float = 1e-5):
    """Linear-kernel PDM: pseudo-Huber of the squared token-mean difference, averaged."""
    d = (x.float().mean(dim=1) - y.float().mean(dim=1)) ** 2
    return ((d + c * c).sqrt().clamp(min=eps) - c).mean()


def _noise(x, eps, sigma_B):
    return sigma_B[:, None, None, None] * eps + (1.0 - sigma_B[:, None, None, None]) * x


class TorchSwD:
    """Both model copies, the head, two AdamW optimisers and the reference's fake / generator updates."""

    def __init__(self, diffusers_config: dict, *, scales: Sequence[int], boundaries: Sequence[int], sigmas: np.ndarray,
                 lora_rank: int = 64, cls_blocks: Sequence[int] = (11,), n_fake_steps: int = 5,
                 cfg_teacher: float = 7.0, dmd_range=(12, 28), pdm_range=(18, 28), device="cpu",
                 weight_dtype=torch.float32, autocast_dtype=None, gradient_checkpointing: bool = False, seed: int = 0):
        from diffusers import SD3Transformer2DModel
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(seed)
        self.device, self.autocast_dtype = torch.device(device), autocast_dtype
        with self.device:
            base = SD3Transformer2DModel(**diffusers_config)
        base.requires_grad_(False)
        base.to(dtype=weight_dtype)
        lora = LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        fake_base = copy.deepcopy(base)  # the reference's second copy of the base weights
        self.student = get_peft_model(base, lora)  # also the teacher, with its adapter disabled
        self.fake = get_peft_model(fake_base, lora)
        self.head = discriminator_head(base.inner_dim).to(self.device)
        if gradient_checkpointing:
            self.student.base_model.model.enable_gradient_checkpointing()
            self.fake.base_model.model.enable_gradient_checkpointing()
        trainable = lambda mod: [p for p in mod.parameters() if p.requires_grad]
        self.student_params = trainable(self.student)
        self.fake_params = trainable(self.fake) + list(self.head.parameters())
        adamw = dict(lr=5e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.opt_student = torch.optim.AdamW(self.student_params, **adamw)
        self.opt_fake = torch.optim.AdamW(self.fake_params, **adamw)
        self.scales, self.boundaries = list(scales), list(boundaries)
        self.sigmas = torch.as_tensor(np.asarray(sigmas, np.float32), device=self.device)
        self.cls_blocks, self.n_fake_steps, self.cfg_teacher = tuple(cls_blocks), n_fake_steps, cfg_teacher
        self.dmd_range, self.pdm_range = dmd_range, pdm_range

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _fwd(self, peft_model, *args, **kw):
        with self._autocast():
            return sd3_forward(peft_model.base_model.model, *args, **kw)

    def _student_sample(self, batch, k: int):
        """x_fake = x_in - sigma_b * G(x_in), x_in = bicubic-up(x_prev) noised to sigma[b_k] (grad as enabled)."""
        x_prev = batch["x_prev"]
        if k > 0:
            x_prev = F.interpolate(x_prev, size=self.scales[k], mode="bicubic")
        B = x_prev.shape[0]
        sigma = self.sigmas[self.boundaries[k]].expand(B)
        x_in = _noise(x_prev, torch.randn_like(x_prev), sigma)
        v, _ = self._fwd(self.student, x_in, batch["context"], batch["pooled"], 1000.0 * sigma)
        return x_in - sigma[:, None, None, None] * v

    def fake_update(self, batch, k: int):
        """The reference's `fake_diffusion_loss` + optimiser step on the fake LoRA and head."""
        self.opt_fake.zero_grad(set_to_none=True)
        with torch.no_grad():
            x_fake = self._student_sample(batch, k)
        B = x_fake.shape[0]
        idx = torch.randint(0, len(self.sigmas) - 1, (B,), device=self.device)
        sigma = self.sigmas[idx]
        eps = torch.randn_like(x_fake)
        x_noisy = _noise(x_fake, eps, sigma)
        ctx, pooled = batch["context"], batch["pooled"]
        v, feats_fake = self._fwd(self.fake, x_noisy, ctx, pooled, 1000.0 * sigma, self.cls_blocks)
        loss = F.mse_loss((x_noisy - sigma[:, None, None, None] * v).float(), x_fake.float())
        feats_real = self._fwd(self.fake, _noise(batch["x"], eps, sigma), ctx, pooled, 1000.0 * sigma,
                               self.cls_blocks, features_only=True)
        loss = loss + 1e-2 * gan_loss(self.head, feats_fake, feats_real)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.fake_params, 10.0)
        self.opt_fake.step()
        return loss.detach()

    def generator_update(self, batch, uncond, k: int):
        """The reference's `generator_loss` (DMD + GAN + PDM) + optimiser step on the student LoRA."""
        self.opt_student.zero_grad(set_to_none=True)
        x_fake = self._student_sample(batch, k)
        B = x_fake.shape[0]
        ctx, pooled = batch["context"], batch["pooled"]
        u_ctx, u_pooled = uncond["context"].expand(B, -1, -1), uncond["pooled"].expand(B, -1)
        idx = torch.randint(*self.dmd_range, (B,), device=self.device)
        sigma = self.sigmas[idx]
        t = 1000.0 * sigma
        x_noisy = _noise(x_fake, torch.randn_like(x_fake), sigma)
        s = sigma[:, None, None, None]
        with torch.no_grad():
            with self.student.disable_adapter():
                v_real, _ = self._fwd(self.student, x_noisy, ctx, pooled, t)
                if self.cfg_teacher > 1.0:
                    v_uncond, _ = self._fwd(self.student, x_noisy, u_ctx, u_pooled, t)
                    v_real = v_uncond + self.cfg_teacher * (v_real - v_uncond)
            v_fake, _ = self._fwd(self.fake, x_noisy, ctx, pooled, t)
            x0_real, x0_fake = x_noisy - s * v_real, x_noisy - s * v_fake
        p_real, p_fake = x_fake - x0_real, x_fake - x0_fake
        grad = torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True))
        loss = 0.5 * F.mse_loss(x_fake.float(), (x_fake - grad).detach().float())
        self.fake.requires_grad_(False)
        self.head.requires_grad_(False)
        feats = self._fwd(self.fake, x_noisy, ctx, pooled, t, self.cls_blocks, features_only=True)
        loss = loss + 5e-3 * gan_loss(self.head, feats)
        idx = torch.randint(*self.pdm_range, (B,), device=self.device)
        sigma = self.sigmas[idx]
        eps = torch.randn_like(x_fake)
        f_fake = self._fwd(self.fake, _noise(x_fake, eps, sigma), ctx, pooled, 1000.0 * sigma, self.cls_blocks,
                           features_only=True)[0]
        f_real = self._fwd(self.fake, _noise(batch["x"], eps, sigma), ctx, pooled, 1000.0 * sigma, self.cls_blocks,
                           features_only=True)[0]
        loss = loss + pdm_linear(f_real, f_fake)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student_params, 10.0)
        self.opt_student.step()
        for p in self.fake_params:
            p.requires_grad_(True)
        return loss.detach()

    def iteration(self, batches: dict, uncond: dict, k: int):
        """n_fake fake updates on batches[0..n-1], then the generator update on batches[n] (all at interval k)."""
        fake_losses = [self.fake_update({key: v[i] for key, v in batches.items()}, k)
                       for i in range(self.n_fake_steps)]
        gen_loss = self.generator_update({key: v[self.n_fake_steps] for key, v in batches.items()}, uncond, k)
        return torch.stack(fake_losses), gen_loss


def to_torch_nchw(batches: dict, device="cpu", dtype=torch.float32) -> dict:
    """Our NHWC numpy batches -> torch tensors, latents as NCHW."""
    out = {}
    for key, v in batches.items():
        t = torch.as_tensor(np.asarray(v), dtype=dtype, device=device)
        out[key] = t.movedim(-1, -3).contiguous() if key in ("x", "x_prev") else t
    return out


@torch.no_grad()
def scale_wise_sample_torch(model, context, pooled, scales: Sequence[int], sigmas: Sequence[float], *,
                            channels: int = 16, generator=None, autocast_dtype=None):
    """The reference sampler (`FlowMatchingSolver.sampling`, do_scales=True): x0 at each scale, bicubic up, renoise.

    With all scales equal this is the full-resolution few-step sampler. Returns the final x0, NCHW float32.
    """
    dev = context.device
    B = context.shape[0]
    x = torch.randn((B, channels, scales[0], scales[0]), device=dev, generator=generator)
    ctx = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    for i, s in enumerate(scales):
        sigma = float(sigmas[i])
        with ctx:
            v = model(hidden_states=x.to(context.dtype), encoder_hidden_states=context, pooled_projections=pooled,
                      timestep=torch.full((B,), 1000.0 * sigma, device=dev), return_dict=False)[0]
        x0 = x - sigma * v.float()
        if i == len(scales) - 1:
            return x0
        if scales[i + 1] != s:
            x0 = F.interpolate(x0, size=scales[i + 1], mode="bicubic")
        nxt = float(sigmas[i + 1])
        x = nxt * torch.randn(x0.shape, device=dev, generator=generator) + (1.0 - nxt) * x0
    return x


def lora_param_count(model) -> int:
    return int(sum(math.prod(p.shape) for n, p in model.named_parameters() if "lora_" in n))
