"""Check our converted MMDiT or FLUX (+ LoRA) against diffusers/PyTorch on the same random inputs, block by block.

    swd-verify FOLDER [--lora ADAPTER] [--sizes 64 96 128] [--batch 2] [--dtype float32|bfloat16]
                             [--device cpu|cuda] [--tol T] [--text-tokens 77] [--components]

FOLDER is a diffusers transformer folder or a pipeline folder (then FOLDER/transformer); its config's `_class_name`
picks SD3 (SD3Transformer2DModel) or FLUX (FluxTransformer2DModel: `swd_jax.convert.verify_flux`, blocks numbered
double then single, sigmas in [0, 1) and for FLUX-dev a guidance scale of 3.5 or 4.5 per example). FOLDER may also
be a converted checkpoint written by `swd-convert` (what training reads): it is compared with the diffusers folder
its conversion.json names, or `--reference FOLDER`. Every folder may be `gs://...` (a converted checkpoint is read
from there as training reads it; diffusers folders and adapters are downloaded to a local cache); FOLDER,
--reference and --lora may be Hub ids (ORG/NAME[@REV], through the Hugging Face cache). Needs the PyTorch extra (`pip install -e .[torch]`). ADAPTER is a PEFT
adapter folder (loaded on the torch side with `PeftModel.from_pretrained`) or a diffusers LoRA file/folder
(`load_lora_adapter`); our side uses `swd_jax.convert.peft_lora.import_lora`. At every latent size the same
random latents, context, pooled vector and one timestep per example (uniform in [0, 1000)) go through both;
torch forward hooks capture each block's image hidden states, our MMDiT returns them as feature taps. The table
gives max|ours - torch| and the relative error max|ours - torch| / max|torch| of the output and every block;
exit status: 0 all within tolerance, 1 some relative error exceeds it, 2 the comparison could not run (bad input,
or either side failed: a missing tensor, a truncated file, an adapter that does not fit), with a one-line reason.

Tolerances (relative). fp32 default 1e-5: tiny random models agree to ~1e-6 (tests/test_verify.py), and so
does a random 24-block SD3.5-M-shaped model of small width (measured on CPU: <= 2.3e-6 at every block). Real
SD3.5 weights in fp32 (TF32 is switched off on both sides): expected ~1e-6..1e-5, possibly up to ~1e-4 from the
wider reductions and larger activations of trained weights -- an estimate, not yet measured on real weights; pass
`--tol 1e-4` if only that is exceeded. bf16 default 5e-2: both sides compute in bf16 but round in different
places (we keep norms, softmax and modulation in fp32), so the error is bf16 noise (2^-8 per rounding) grown
over the blocks: measured on CPU 1.4e-2 (tiny, 2 blocks) and up to 3.0e-2 (random 24-block model); real weights
on a GPU are not yet measured, so 5e-2 is an estimate.
`--components` also compares the VAE and text encoders of a pipeline folder
(`swd_jax.convert.verify_components.compare_components`, fp32, tolerance `--components-tol`).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from swd_jax import storage
from swd_jax.cli.common import add_common_flags, quiet_logs
from swd_jax.convert.converted import conversion_source, load_converted, model_kind, read_config
from swd_jax.convert.folders import PIPELINE_PARTS, from_hub, local_model_folder, local_path
from swd_jax.convert.peft_lora import import_lora
from swd_jax.convert.safetensors_reader import SafetensorsFolder
from swd_jax.convert.converted import load_diffusers
from swd_jax.convert.transformer import transformer_class, transformer_folder
from swd_jax.models.mmdit import MMDiT, MMDiTConfig

DEFAULT_TOL = {"float32": 1e-5, "bfloat16": 5e-2}  # see the module docstring
DEFAULT_COMPONENTS_TOL = 1e-4  # fp32 VAE/CLIP/T5 on real weights: an estimate, not yet measured
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
_JNP_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_inputs(cfg: MMDiTConfig, batch: int, latent: int, text_tokens: int, seed: int):
    """Random (latents NCHW, timesteps [B] in [0, 1000), context [B,T,J], pooled [B,P]) as float32 numpy."""
    rng = np.random.default_rng([seed, latent])
    return (rng.standard_normal((batch, cfg.in_channels, latent, latent), dtype=np.float32),
            rng.uniform(0, 1000, batch).astype(np.float32),  # one timestep per example
            rng.standard_normal((batch, text_tokens, cfg.joint_attention_dim), dtype=np.float32),
            rng.standard_normal((batch, cfg.pooled_projection_dim), dtype=np.float32))


def _round(inputs, dtype: str):
    """Round latents/context/pooled to the compute dtype (timesteps stay float32), identically for both sides."""
    x, t, c, p = inputs
    def cast(a):
        return a.astype(_NP_DTYPES[dtype]).astype(np.float32)
    return cast(x), t, cast(c), cast(p)


# ----------------------------------------------------------------------------------------------------------------
# torch side
# ----------------------------------------------------------------------------------------------------------------
def torch_outputs(folder: str, lora: str | None, runs: dict[int, tuple], dtype: str, device: str) -> dict:
    """{size: (velocity NHWC, [block image hidden states])} from diffusers (+ PEFT), float32 numpy on the host."""
    import torch
    from diffusers import SD3Transformer2DModel

    from swd_jax.convert.torch_transformer import block_features, free_torch_memory, load_torch_transformer

    model = load_torch_transformer(SD3Transformer2DModel, folder, lora, dtype, device)
    tdt = model.dtype
    out = {}

    def to(a):
        return torch.from_numpy(a).to(device, tdt)
    with block_features(model.transformer_blocks) as feats:
        for size, (x, t, c, p) in runs.items():
            v = model(hidden_states=to(x), timestep=torch.from_numpy(t).to(device), encoder_hidden_states=to(c),
                      pooled_projections=to(p)).sample
            out[size] = (v.float().cpu().numpy().transpose(0, 2, 3, 1), [feats[i] for i in sorted(feats)])
            feats.clear()
    del model  # first, then freed: torch and JAX never share the GPU
    free_torch_memory()
    return out


# ----------------------------------------------------------------------------------------------------------------
# our side
# ----------------------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _forward(model: MMDiT, variables, x_BHWC, t_B, c_BTJ, p_BP):
    """One compiled forward per (model, shape): velocity and every block's image tokens."""
    blocks = tuple(range(model.config.num_layers))
    return model.apply(variables, x_BHWC, t_B, c_BTJ, p_BP, feature_blocks=blocks)


def our_outputs(folder: str, lora: str | None, runs: dict[int, tuple], dtype: str, device: str,
                perturb: Callable[[dict], dict] | None = None, converted: str | None = None) -> dict:
    """{size: (velocity NHWC, [block image hidden states])} from our converter + MMDiT, float32 numpy.

    With `converted` (a checkpoint written by `swd-convert`) our params are read from it, exactly as training
    reads them, and cast to `dtype` for the comparison; else `folder` is converted in memory."""
    platform = "gpu" if device == "cuda" else device
    try:
        dev = jax.devices(platform)[0]
    except RuntimeError as e:
        raise ValueError(f"--device {device}: JAX has no {platform} backend here ({e})") from e
    jdt = _JNP_DTYPES[dtype]
    with jax.default_device(dev):
        if converted is not None:
            cfg, params = load_converted(converted)
            params = jax.tree.map(lambda a: jnp.asarray(a, jdt), params)
        else:
            cfg, params = load_diffusers(folder, dtype=jdt)
        if perturb is not None:
            params = perturb(params)
        variables = {"params": params}
        lora_cfg = None
        if lora is not None:
            lora_cfg, variables["lora"] = import_lora(lora, cfg, dtype=jdt)
    variables = jax.device_put(variables, dev)
    model = MMDiT(cfg, lora=lora_cfg, dtype=jdt, param_dtype=jdt)
    out = {}
    precision = "highest" if dtype == "float32" else "default"  # no TF32/bf16 passes for fp32 on GPUs

    def put(a):
        return jax.device_put(jnp.asarray(a, jdt), dev)
    with jax.default_matmul_precision(precision):
        for size, (x, t, c, p) in runs.items():
            v, feats = _forward(model, variables, put(x.transpose(0, 2, 3, 1)), jax.device_put(t, dev), put(c), put(p))
            out[size] = (np.asarray(v, np.float32), [np.asarray(f, np.float32) for f in feats])
    return out


# ----------------------------------------------------------------------------------------------------------------
# the comparison
# ----------------------------------------------------------------------------------------------------------------
def _conversion_source(converted: str) -> str:
    source = conversion_source(converted)
    if not source or not storage.isdir(source):
        raise FileNotFoundError(f"{converted}: its diffusers source {source!r} (conversion.json) is not here; "
                                "pass --reference FOLDER")
    return source


def _errors(ours, ref) -> tuple[float, float]:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    max_abs = float(np.abs(ours - ref).max())
    return max_abs, max_abs / max(float(np.abs(ref).max()), 1e-30)


def _components(folder: str, device: str, tol: float) -> tuple[dict[str, float], bool]:
    """VAE / text-encoder parity via the components helper, if present (hook: the module may be absent)."""
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        raise ValueError(f"--components needs a pipeline folder (model_index.json); {folder} is not one")
    try:
        from swd_jax.convert.verify_components import compare_components
    except ImportError as e:  # HOOK: swd_jax/convert/verify_components.py provides compare_components(folder)
        print(f"components: not compared, swd_jax.convert.verify_components is unavailable ({e})")
        return {}, False
    errs = compare_components(folder, torch_device=device)
    return errs, all(v <= tol for v in errs.values())


def verify(folder: str, lora: str | None = None, sizes: Sequence[int] = (64, 96, 128), batch: int = 2,
           dtype: str = "float32", device: str = "cpu", tol: float | None = None, text_tokens: int = 77,
           seed: int = 0, perturb: Callable[[dict], dict] | None = None, components: bool = False,
           components_tol: float = DEFAULT_COMPONENTS_TOL, verbose: bool = True, reference: str | None = None) -> dict:
    """Compare ours vs diffusers -> {"ok", "tol", "errors": {size: {"output"|"block i": (max_abs, rel)}}, ...}.

    `folder` is a diffusers folder (converted in memory) or a converted checkpoint (`swd-convert`'s output; then
    `reference`, default the source recorded in its conversion.json, is the diffusers folder to compare with).
    `perturb(params) -> params` edits our converted base params before the run (to test that checks bite).
    """
    if dtype not in DEFAULT_TOL:
        raise ValueError(f"dtype {dtype!r} not supported; choose one of {sorted(DEFAULT_TOL)}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} not supported; choose 'cpu' or 'cuda'")
    if batch < 1 or not sizes:
        raise ValueError("need batch >= 1 and at least one latent size")
    tol = DEFAULT_TOL[dtype] if tol is None else tol
    converted = None
    folder = from_hub(folder, PIPELINE_PARTS if components else ("transformer",))  # a Hub id: its snapshot
    if model_kind(folder) == "converted":  # check the checkpoint training reads, against its diffusers source
        converted, folder = folder, reference or _conversion_source(folder)
    elif reference is not None:
        raise ValueError(f"--reference is for a converted checkpoint; {folder} is a diffusers folder")
    folder = local_model_folder(folder, parts=PIPELINE_PARTS if components else ("transformer",))
    if lora is not None:
        lora = local_path(lora, what="LoRA adapter")
    tfolder = transformer_folder(folder)
    SafetensorsFolder(tfolder)  # a truncated or garbled file is named here, not by torch's loader
    if transformer_class(tfolder) == "FluxTransformer2DModel":
        from swd_jax.convert import verify_flux as impl
        from swd_jax.models.flux import Flux, FluxConfig
        cfg = FluxConfig.from_folder(tfolder)
        check = Flux(cfg).check_latent_size
        runs = {s: impl.make_inputs(cfg, batch, s, text_tokens, seed, dtype) for s in sizes}
        torch_fn, ours_fn = impl.torch_outputs, impl.our_outputs
    else:
        cfg = MMDiTConfig.from_folder(tfolder)
        check = MMDiT(cfg).check_latent_size
        runs = {s: _round(make_inputs(cfg, batch, s, text_tokens, seed), dtype) for s in sizes}
        torch_fn, ours_fn = torch_outputs, our_outputs
    if converted is not None and read_config(converted) != cfg:
        raise ValueError(f"{converted} was not converted from {folder}: their transformer configs differ")
    for s in sizes:
        check(s, s)
    ref = torch_fn(tfolder, lora, runs, dtype, device)  # first, then freed: the two never share the GPU
    ours = ours_fn(tfolder, lora, runs, dtype, device, perturb, converted)
    errors = {}
    for s in sizes:
        (v, feats), (rv, rfeats) = ours[s], ref[s]
        errors[s] = {"output": _errors(v, rv)}
        errors[s].update({f"block {i}": _errors(f, rf) for i, (f, rf) in enumerate(zip(feats, rfeats, strict=True))})
    ok = all(rel <= tol for per in errors.values() for _, rel in per.values())
    result = {"ok": ok, "tol": tol, "dtype": dtype, "device": device, "errors": errors}
    if components:
        result["components"], comp_ok = _components(folder, device, components_tol)
        result["ok"] = ok and comp_ok
    if verbose:
        print(format_table(result))
    return result


def format_table(result: dict) -> str:
    """The result of `verify` as a text table, worst first flagged with FAIL."""
    tol = result["tol"]
    lines = [f"{'latent':>6}  {'tensor':<10} {'max_abs':>10} {'rel':>10}  (dtype {result['dtype']}, "
             f"device {result['device']}, tol {tol:g})"]
    for size, per in result["errors"].items():
        for name, (max_abs, rel) in per.items():
            lines.append(f"{size:>6}  {name:<10} {max_abs:10.3e} {rel:10.3e}  {'ok' if rel <= tol else 'FAIL'}")
    for name, rel in result.get("components", {}).items():
        lines.append(f"{'':>6}  {name:<24} {rel:10.3e}")
    lines.append("PASS" if result["ok"] else "FAIL")
    return "\n".join(lines)


EXIT_TOLERANCE_EXCEEDED, EXIT_COULD_NOT_RUN = 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swd-verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="diffusers transformer or pipeline folder, or a converted checkpoint (swd-convert)")
    parser.add_argument("--reference", help="for a converted checkpoint: the diffusers folder it came from "
                        "(default: the source recorded in its conversion.json)")
    parser.add_argument("--lora", help="PEFT adapter folder or diffusers LoRA .safetensors (file or folder)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128], help="latent sizes (pixels / 8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DEFAULT_TOL), default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tol", type=float, help=f"relative tolerance (default {DEFAULT_TOL})")
    parser.add_argument("--text-tokens", type=int, default=77, help="context length of the random text states")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--components", action="store_true", help="also compare the VAE and text encoders")
    parser.add_argument("--components-tol", type=float, default=DEFAULT_COMPONENTS_TOL)
    add_common_flags(parser)
    args = parser.parse_args(argv)
    quiet_logs(args.verbose)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch's turn
    try:
        result = verify(args.folder, args.lora, args.sizes, args.batch, args.dtype, args.device, args.tol,
                        args.text_tokens, args.seed, components=args.components, components_tol=args.components_tol,
                        reference=args.reference)
    except Exception as e:  # noqa: BLE001  any failure to compare is "could not run", never "mismatch"
        if args.debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"error: could not run the comparison: {type(e).__name__}: {first}", file=sys.stderr)
        return EXIT_COULD_NOT_RUN
    return 0 if result["ok"] else EXIT_TOLERANCE_EXCEEDED


if __name__ == "__main__":
    sys.exit(main())
