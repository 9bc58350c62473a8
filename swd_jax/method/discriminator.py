"""Discriminator head D on fake-model features (METHOD.md s.4; reference `TransformerCls.cls_pred_branch`).

logits = MLP(mean over tokens of feat_BLD), the MLP being `num_layers` x [LayerNorm, GELU, Dense] with widths
int(linspace(width, 1, num_layers + 1)) (1536 -> 1152 -> 768 -> 384 -> 1 for SD3.5-M). One head is shared by
all feature blocks; with several blocks the logits are averaged (reference `gan_loss_fn`).
Torch details matched: LayerNorm eps 1e-5 with affine, exact (erf) GELU, token mean in float32.
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def head_widths(width: int, num_layers: int = 4) -> tuple[int, ...]:
    """Layer widths int(linspace(width, 1, num_layers + 1)), truncated as torch.linspace(..., dtype=int)."""
    if width < 1 or num_layers < 1:
        raise ValueError(f"need width >= 1 and num_layers >= 1, got width={width}, num_layers={num_layers}")
    return tuple(int(v) for v in np.linspace(width, 1, num_layers + 1).astype(np.int64))


def _torch_linear_bias_init(fan_in: int):
    """torch nn.Linear's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# torch nn.Linear's default kernel init (kaiming_uniform, a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class DiscriminatorHead(nn.Module):
    """Token-mean then [LayerNorm, GELU, Dense] x num_layers -> logits [B]; a list of blocks averages logits.

    Parameters: `norm_{j}` (scale, bias) and `dense_{j}` (kernel [in, out], bias) for j = 0..num_layers-1,
    i.e. torch `cls_pred_branch.{j}.0` and `cls_pred_branch.{j}.2` (weight transposed). Dense layers use
    torch nn.Linear's default init. Logical axes: LayerNorm ('embed',), kernels ('embed', 'mlp'), and
    ('embed', None) for the last kernel, whose output width is 1.
    """

    width: int
    num_layers: int = 4
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: jnp.ndarray | Sequence[jnp.ndarray]) -> jnp.ndarray:
        blocks = list(feats) if isinstance(feats, (list, tuple)) else [feats]
        if not blocks:
            raise ValueError("DiscriminatorHead got an empty list of feature blocks")
        for f in blocks:
            if f.ndim != 3 or f.shape[-1] != self.width:
                raise ValueError(f"features must be [B, L, {self.width}], got {f.shape}")
        widths = head_widths(self.width, self.num_layers)
        layers = []
        for j in range(self.num_layers):
            last = j == self.num_layers - 1
            out_axis = None if last else "mlp"
            norm = nn.LayerNorm(
                epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                name=f"norm_{j}")
            dense = nn.Dense(
                widths[j + 1], dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(_torch_linear_kernel_init, ("embed", out_axis)),
                bias_init=nn.with_logical_partitioning(_torch_linear_bias_init(widths[j]), (out_axis,)),
                name=f"dense_{j}")
            layers.append((norm, dense))

        logits_B = 0.0
        for f_BLD in blocks:
            h = f_BLD.astype(jnp.float32).mean(axis=1)
            for norm, dense in layers:
                h = dense(nn.gelu(norm(h), approximate=False).astype(self.dtype)).astype(jnp.float32)
            logits_B = logits_B + h[:, 0]
        return logits_B / len(blocks)
