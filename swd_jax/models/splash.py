"""TPU flash attention for MMDiT: the Pallas splash kernel, padded to its blocks and sharded with `shard_map`.

`attention_impl="splash"` (model config) routes `layers.dot_product_attention` here. The kernel computes
softmax(q k^T) v blockwise in float32 (never materialising the [L, S] logits, forward or backward). MMDiT has
no causal structure, so the mask only hides the padding that brings the joint sequence (e.g. 4096 image + 333
text tokens) to a multiple of the block size.

Under a mesh (`jax.set_mesh`), the kernel runs per device through `jax.shard_map` with the batch over the
activation-batch mesh axes and heads over the heads axis (the logical-axis rules in force): a Mosaic kernel
cannot be partitioned by the compiler itself. A batch or head count that does not divide runs replicated.

The compile target, not the host, decides: the kernel is built for TPU (Mosaic, `interpret=False`) when the
mesh in force (`jax.set_mesh`) is made of TPU devices -- real chips, or the abstract devices of
`jax.experimental.topologies.get_topology_desc` for an ahead-of-time compile from a CPU host -- or, with no
mesh, when the default backend is TPU. `INTERPRET = True` runs it in Pallas interpret mode on any target
(slow, for tests on CPU). Any other target gets a clear error instead of a silent fallback.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from swd_jax.models.partitioning import axes_size

# The checkpoint name of the kernel's output and softmax statistics: what the "attention" remat policies keep
# (swd_jax.models.layers.remat_saved).
ATTENTION_RESIDUALS = "attention_residuals"

INTERPRET = False  # tests set this to run the Pallas kernel in interpret mode on CPU
FP32_PRECISIONS = ("high", "highest", "float32", "tensorfloat32")  # Mosaic: fp32 contract precision


def _block(n: int) -> int:
    return 512 if n >= 512 else 128


@functools.lru_cache(maxsize=32)
def _mask(heads: int, q_len: int, kv_len: int, kv_valid: int):
    """The [heads, q_len, kv_len] mask that hides keys >= kv_valid (numpy: safe to share between traces)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    mask = np.zeros((q_len, kv_len), dtype=bool)
    mask[:, :kv_valid] = True
    return sm.MultiHeadMask([sm.NumpyMask(mask)] * heads)


def _kernel(heads: int, q_len: int, kv_len: int, kv_valid: int, block_q: int, block_kv: int, interpret: bool,
            fused_backward: bool = False):
    """A splash MHA kernel for [heads, q_len, D] x [heads, kv_len, D]; keys >= kv_valid are padding.

    Its output and log-sum-exp carry the checkpoint name ATTENTION_RESIDUALS (kept by the "attention" remat
    policies). `fused_backward`: one backward kernel computes dq, dk and dv (dq's per-key-block partials are
    written in q's dtype and summed after); else separate dq and dk/dv kernels, dq accumulated in float32.
    Built per call, not cached: its mask arrays are constants of the trace that builds it (the mask
    processing itself is cached by Pallas, by mask content).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    dq = {} if fused_backward else dict(block_q_dq=block_q, block_kv_dq=block_kv)
    sizes = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
                          block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, use_fused_bwd_kernel=fused_backward,
                          **dq)
    return sk.make_splash_mha(_mask(heads, q_len, kv_len, kv_valid), block_sizes=sizes, head_shards=1,
                              q_seq_shards=1, residual_checkpoint_name=ATTENTION_RESIDUALS, interpret=interpret)


def _local_attention(q_BLHD, k_BSHD, v_BSHD, interpret: bool, fused_backward: bool = False):
    """Splash attention on one device's shard: pad to the blocks, [B, H, L, D] layout, vmap over the batch."""
    B, L, H, D = q_BLHD.shape
    S = k_BSHD.shape[1]
    bq, bkv = _block(L), _block(S)
    Lp, Sp = -(-L // bq) * bq, -(-S // bkv) * bkv
    kernel = _kernel(H, Lp, Sp, S, bq, bkv, interpret, fused_backward)
    # The kernel does not scale the logits: scale q in float32 (1/8 for SD3's head dim 64 is exact anyway).
    q = (q_BLHD.astype(jnp.float32) / math.sqrt(D)).astype(q_BLHD.dtype)
    to_bhld = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    o_BHLD = jax.vmap(kernel)(to_bhld(q, Lp), to_bhld(k_BSHD, Sp), to_bhld(v_BSHD, Sp))
    return o_BHLD.transpose(0, 2, 1, 3)[:, :L].astype(v_BSHD.dtype)


def target_platform() -> str:
    """The platform being compiled for: that of the current mesh's devices, else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return jax.default_backend() if device is None else device.platform


def splash_attention(q_BLHD, k_BSHD, v_BSHD, fused_backward: bool = False):
    """softmax(q k^T / sqrt(D)) v with the splash kernel; per device under the current mesh, if any.

    `fused_backward`: the kernel's fused backward (attention_impl "splash_fused"; see `_kernel`)."""
    target = target_platform()
    if target != "tpu" and not INTERPRET:
        raise ValueError(f"attention_impl='splash' needs a TPU (compiling for: {target!r}); "
                         "use 'cudnn' on GPU or 'chunked' anywhere")
    if not INTERPRET and q_BLHD.dtype == jnp.bfloat16 and jax.config.jax_default_matmul_precision in FP32_PRECISIONS:
        raise ValueError("splash attention on bf16 needs the default matmul precision (Mosaic rejects fp32-precision "
                         f"dots on bf16); jax_default_matmul_precision is {jax.config.jax_default_matmul_precision!r}")
    local = functools.partial(_local_attention, interpret=INTERPRET, fused_backward=fused_backward)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q_BLHD, k_BSHD, v_BSHD)
    batch_axes, _, head_axes, _ = nn.logical_to_mesh_axes(("activation_batch", None, "heads", None))
    if q_BLHD.shape[0] % axes_size(mesh, batch_axes):
        batch_axes = None
    if q_BLHD.shape[2] % axes_size(mesh, head_axes):
        head_axes = None
    spec = P(batch_axes, None, head_axes, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
        q_BLHD, k_BSHD, v_BSHD)
