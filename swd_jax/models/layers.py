"""Building blocks shared by our Flax models: LoRA-able Dense, norms, attention, sinusoidal embeddings.

Conventions: `dtype` is the compute dtype, `param_dtype` the storage dtype; norms, softmax and adaptive
modulation run in float32. Every parameter carries logical axis names (`nn.with_logical_partitioning`).
LoRA factors live in the separate `lora` variable collection: without that collection a LoraDense is exactly
its base Dense.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from swd_jax.models.splash import ATTENTION_RESIDUALS, splash_attention

LORA = "lora"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA on the Dense layers whose diffusers module path ends with one of `targets` (PEFT matching).

    scale = alpha / rank (PEFT without rsLoRA). A ~ N(0, (1/rank)^2) as PEFT's `init_lora_weights="gaussian"`,
    B = 0, so a fresh LoRA leaves the model unchanged.
    """
    rank: int = 64
    alpha: float = 64.0
    # The reference's SwD runs (`--apply_lora_to_attn_projections --apply_lora_to_mlp_projections`): image-stream
    # attention (and attn2 of MMDiT-X) plus the MLPs of both streams. Add "add_q_proj", "add_k_proj",
    # "add_v_proj", "to_add_out" for the text-stream attention.
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def matches(self, module_path: str) -> bool:
        return any(module_path == t or module_path.endswith("." + t) for t in self.targets)


def diffusers_module_path(scope_path: tuple[str, ...]) -> str:
    """Our Linen scope path -> the diffusers module path (`transformer_blocks_3/attn/to_out_0` -> `...3.attn.to_out.0`)."""
    from swd_jax.models.names import our_to_diffusers  # local import: names.py is tiny and torch-free
    return our_to_diffusers("/".join(scope_path))


class LoraDense(nn.Module):
    """y = x W + b (+ scale * x A B when this layer is a LoRA target and the `lora` collection is present)."""
    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    lora: LoraConfig | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.axes),
                            (in_features, self.features), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), jnp.asarray(kernel, self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                              (self.features,), self.param_dtype)
            y = y + jnp.asarray(bias, self.dtype)
        if self.lora is not None and (self.has_variable(LORA, "lora_A") or self.is_initializing()) \
                and self.lora.matches(diffusers_module_path(self.scope.path)):
            r = self.lora.rank
            a = self.variable(LORA, "lora_A", lambda: jax.random.normal(
                self.make_rng("params"), (in_features, r), self.param_dtype) / r).value
            b = self.variable(LORA, "lora_B", lambda: jnp.zeros((r, self.features), self.param_dtype)).value
            xa = jnp.dot(x.astype(self.dtype), jnp.asarray(a, self.dtype))
            y = y + self.lora.scale * jnp.dot(xa, jnp.asarray(b, self.dtype))
        return y


def layer_norm(x, eps: float = 1e-6):
    """LayerNorm without affine parameters, computed in float32 (torch `nn.LayerNorm(elementwise_affine=False)`)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, in float32 (diffusers/T5 RMSNorm)."""
    eps: float = 1e-6
    axis_name: str | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return x32 * scale.astype(jnp.float32)


ATTENTION_IMPLS = ("xla", "cudnn", "chunked", "splash", "splash_fused")
SPLASH_IMPLS = ("splash", "splash_fused")

# What a rematerialised block keeps from its forward for the backward pass (`remat=True`):
#   "full": only the block's inputs; everything else is recomputed (the reference's gradient checkpointing);
#   "attention": also the splash kernel's output and log-sum-exp, so the backward does not rerun the attention
#       kernel's forward (1 activation per attention; needs a splash attention_impl);
#   "dots": also every matmul output without batch dimensions (projections and MLPs; recomputes norms,
#       activations, modulation and attention);
#   "dots_attention": both.
# More memory, less compute from first to last; values and gradients are the same.
REMAT_POLICIES = ("full", "attention", "dots", "dots_attention")


def remat_saved(policy: str):
    """The `jax.checkpoint` policy of one of REMAT_POLICIES (None: save nothing)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={policy!r}; expected one of {REMAT_POLICIES}")
    cp = jax.checkpoint_policies
    return {"full": None, "attention": cp.save_only_these_names(ATTENTION_RESIDUALS),
            "dots": cp.dots_with_no_batch_dims_saveable,
            "dots_attention": cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable,
                                                         cp.save_only_these_names(ATTENTION_RESIDUALS))}[policy]


def check_remat(policy: str, attention_impl: str) -> None:
    """One clear line where a remat policy cannot do what it says with the attention in use."""
    remat_saved(policy)
    if "attention" in policy and attention_impl not in SPLASH_IMPLS:
        raise ValueError(f"remat_policy={policy!r} keeps the splash kernel's residuals; attention_impl is "
                         f"{attention_impl!r} (expected one of {SPLASH_IMPLS}, or remat_policy 'full' / 'dots')")


def check_blocks_without_remat(n: int, num_blocks: int, remat: bool) -> int:
    """`n` if it is a valid count of blocks to run without remat (the last n of num_blocks), else one clear line."""
    if not 0 <= n <= num_blocks:
        raise ValueError(f"blocks_without_remat={n}: expected 0..{num_blocks} (the model has {num_blocks} blocks)")
    if n and not remat:
        raise ValueError(f"blocks_without_remat={n} needs remat=True (with remat off no block is rematerialised)")
    return n


def remat_block(block_cls, remat: bool, policy: str = "full", attention_impl: str = "xla", scanned: bool = False):
    """`block_cls` rematerialised with `policy` (one of REMAT_POLICIES) if `remat`, else as is.

    `scanned`: the block runs as a scan body, where the loop already keeps XLA from merging the recomputation
    into the forward (`prevent_cse=False`, as jax.checkpoint advises under scan)."""
    saved = remat_saved(policy)
    if not remat:
        return block_cls
    check_remat(policy, attention_impl)
    return nn.remat(block_cls, policy=saved, prevent_cse=not scanned)


ATTENTION_CHUNK = 512  # query rows per chunk of the "chunked" attention


def dot_product_attention(q_BLHD, k_BSHD, v_BSHD, impl: str = "xla", chunk: int | None = None):
    """softmax(q k^T / sqrt(D)) v, the logits and softmax in float32.

    impl: "xla" (any backend; all [B, H, L, S] logits live at once), "cudnn" (GPU flash kernel) or "chunked"
    (any backend; queries in chunks of ATTENTION_CHUNK, each rematerialised, so only [B, H, chunk, S] logits
    are ever live, forward and backward: the memory profile of a flash attention at the same FLOPs) or
    "splash" (TPU Pallas flash kernel, sharded per device: `swd_jax.models.splash`) or "splash_fused" (the same
    with its fused backward kernel: dq in the dk/dv kernel, partial dq sums in the input dtype).
    """
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q_BLHD, k_BSHD, v_BSHD, implementation="cudnn")
    if impl == "chunked":
        return chunked_attention(q_BLHD, k_BSHD, v_BSHD, chunk)
    if impl in SPLASH_IMPLS:
        return splash_attention(q_BLHD, k_BSHD, v_BSHD, fused_backward=impl == "splash_fused")
    if impl != "xla":
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}")
    scale = 1.0 / math.sqrt(q_BLHD.shape[-1])
    logits_BHLS = jnp.einsum("blhd,bshd->bhls", q_BLHD, k_BSHD, preferred_element_type=jnp.float32) * scale
    probs_BHLS = jax.nn.softmax(logits_BHLS, axis=-1).astype(v_BSHD.dtype)
    return jnp.einsum("bhls,bshd->blhd", probs_BHLS, v_BSHD)


def chunked_attention(q_BLHD, k_BSHD, v_BSHD, chunk: int | None = None):
    """The "xla" attention over query chunks (default ATTENTION_CHUNK), each under `jax.checkpoint`."""
    B, L, H, D = q_BLHD.shape
    chunk = chunk or ATTENTION_CHUNK
    if L <= chunk:
        return dot_product_attention(q_BLHD, k_BSHD, v_BSHD, "xla")
    n = -(-L // chunk)
    chunk = -(-L // n)
    chunk = -(-chunk // 8) * 8  # n balanced chunks, multiples of 8: 4429 -> 9 x 496 (not 9 x 512)
    q_BLHD = jnp.pad(q_BLHD, ((0, 0), (0, n * chunk - L), (0, 0), (0, 0)))
    q_NBCHD = q_BLHD.reshape(B, n, chunk, H, D).transpose(1, 0, 2, 3, 4)
    one = jax.checkpoint(lambda q_BCHD: dot_product_attention(q_BCHD, k_BSHD, v_BSHD, "xla"))
    o_NBCHD = jax.lax.map(one, q_NBCHD)
    return o_NBCHD.transpose(1, 0, 2, 3, 4).reshape(B, n * chunk, H, D)[:, :L]


# torch's float32 CPU exp, which diffusers' `get_timestep_embedding` uses, is not correctly rounded everywhere: for
# the SD3/FLUX table (half 128, max_period 10000) it is one ulp above the correctly rounded value at entries 12 and
# 106 (torch 2.13 CPU, the same under every ATEN_CPU_CAPABILITY and MKL_CBWR setting). One ulp of a frequency,
# times a timestep near 1000, moves the embedding by 3e-5. tests/test_mmdit_strong_weights.py checks bit equality.
_TORCH_EXP_ULPS = {(128, 10000.0): {12: 1, 106: 1}}  # (half, max_period) -> {entry: ulps above correct rounding}


def timestep_frequencies(half: int, max_period: float = 10000.0) -> np.ndarray:
    """[half] float32 exp(-ln(max_period) i / half), computed on the host bit-identical to diffusers' table.

    The exponent with diffusers' float32 operations in their order, exp correctly rounded (float64, rounded to
    float32), then torch's known one-ulp deviations (`_TORCH_EXP_ULPS`). XLA's own exp differs from torch's at 17
    of the 128 entries.
    """
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    bits = freqs.view(np.int32)
    for i, ulps in _TORCH_EXP_ULPS.get((half, float(max_period)), {}).items():
        bits[i] += ulps
    return freqs


def timestep_embedding(t_B, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal embedding [cos, sin] (diffusers `get_timestep_embedding`, flip_sin_to_cos=True, shift 0), float32."""
    freqs = jnp.asarray(timestep_frequencies(dim // 2, max_period))
    args_BF = t_B.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args_BF), jnp.sin(args_BF)], axis=-1)


def sincos_table_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """[len(pos), D] [sin, cos](pos omega) in float64 rounded to float32 (`get_1d_sincos_pos_embed_from_grid`)."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    out = np.outer(np.asarray(pos, np.float64), 1.0 / 10000 ** omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, base_size: int) -> jnp.ndarray:
    """[grid*grid, D] 2-D sin-cos table as diffusers' `get_2d_sincos_pos_embed` (interpolation_scale 1), float32.

    Row i*grid + j is [table_1d(pos_j), table_1d(pos_i)]: the 1-D table on the host, bit-identical to diffusers'
    (float32 positions, float64 sin/cos, rounded once), tiled with jnp so abstract inits (`jax.eval_shape`) stay
    cheap. Used only to initialise random models: converted checkpoints carry diffusers' own table.
    """
    pos = np.arange(grid_size, dtype=np.float32) / np.float32(grid_size / base_size)
    t_GE = jnp.asarray(sincos_table_1d(embed_dim // 2, pos))
    g, e = t_GE.shape
    emb_w = jnp.broadcast_to(t_GE[None, :, :], (g, g, e))  # [i, j] -> pos_j: diffusers' grid[0], the w-major mesh
    emb_h = jnp.broadcast_to(t_GE[:, None, :], (g, g, e))  # [i, j] -> pos_i
    return jnp.concatenate([emb_w, emb_h], axis=-1).reshape(g * g, 2 * e)
