"""The PyTorch side of `swd-verify`: a diffusers transformer (SD3 or FLUX) with an optional LoRA, ready to run."""
from __future__ import annotations

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
