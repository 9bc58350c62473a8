"""The PyTorch side of `swd-verify`: a diffusers transformer (SD3 or FLUX) with an optional LoRA, ready to run."""
from __future__ import annotations

import contextlib
import gc
import os

from swd_jax.convert.peft_lora import adapter_files


def load_torch_transformer(model_cls, folder: str, lora: str | None, dtype: str, device: str):
    """`model_cls.from_pretrained(folder)` in `dtype` on `device`, eval mode, with the PEFT adapter folder or
    diffusers LoRA file `lora` injected (peft's `PeftModel.from_pretrained` / diffusers' `load_lora_adapter`)."""
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this PyTorch has no CUDA device")
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = model_cls.from_pretrained(folder, torch_dtype=tdt)
    if lora is not None:
        fmt, weights, _ = adapter_files(lora)
        if fmt == "peft":
            from peft import PeftModel
            PeftModel.from_pretrained(model, lora)  # injects the LoRA layers into `model` in place
        else:
            model.load_lora_adapter(os.path.dirname(weights), weight_name=os.path.basename(weights),
                                    prefix="transformer")
    return model.to(device).eval()


@contextlib.contextmanager
def block_features(blocks):
    """Run in true fp32 (TF32 off), no grad, with each of `blocks` recording its image hidden states: yields the
    dict {block index: float32 numpy} the forward fills; afterwards TF32 is restored and the hooks removed."""
    import torch
    feats: dict = {}
    handles = [b.register_forward_hook(lambda m, a, out, i=i: feats.__setitem__(i, out[1].float().cpu().numpy()))
               for i, b in enumerate(blocks)]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    try:
        with torch.no_grad():
            yield feats
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for h in handles:
            h.remove()


def free_torch_memory() -> None:
    """Collect and empty torch's CUDA cache (after the caller dropped its model), so JAX can have the GPU."""
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
