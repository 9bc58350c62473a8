"""SwD distillation of FLUX.1-dev into a 4-step scale-wise student (no reference training code exists for it).

The published FLUX-SwD student (yandex-research/swd README): scales 64-80-96-128, sigmas 1.0000 0.8956 0.7363
0.6007 0, guidance 4.5 through FLUX-dev's guidance embedding, T5 max length 512. What this config chooses:
- Schedule: scales 64-80-96-128 on the 28-step, shift-3 flow-matching grid with boundaries 0-7-14-18-28 (the
  SD3.5 reference's). Its boundary sigmas 1.0 .8959 .7371 .6022 are the published FLUX sigmas to 0.0015, so
  this is the grid the published student was trained on as far as its numbers tell; sample it with the
  `flux_4` preset (the published sigmas).
- Teacher: FLUX-dev is guidance-distilled, so there is no classifier-free guidance batch (`loss.cfg_teacher`
  must be 1): the DMD teacher is one pass with the guidance embedding at `loss.guidance_teacher`; the student
  and fake model get `model.guidance`. Both 4.5, the published sampling guidance (the reference gives no
  teacher guidance for FLUX; FLUX-dev's own default is 3.5).
- Feature block for the discriminator and PDM: 26 of FLUX's 57 (19 double-stream then 38 single-stream
  blocks; 26 = single block 7), the reference's relative depth (SD3.5 Medium 11 of 24 = 0.46, Large 20 of 38
  = 0.53; round(57 x 11/24) = 26). Features are the block's image tokens; the forward stops after it.
- LoRA (rank 64) on the image-stream attention (to_q, to_k, to_v, to_out.0) and both MLPs of the double
  blocks (net.0.proj, net.2 of ff and ff_context), as the SD3.5 reference, plus the single blocks' attention
  (to_q, to_k, to_v) and their MLP in / fused output projections (proj_mlp, proj_out; proj_out also names
  the final output layer).

1. Convert once:     python -m swd_jax.convert /path/to/FLUX.1-dev /ckpt/flux_dev --dtype bfloat16
2. Precompute data:  swd-precompute --model /path/to/FLUX.1-dev --data /data/train_data \
                         --out /data/flux_pre --scales 64,80,96,128 --max_sequence_length 512
   (FLUX's VAE and prompt encoder, chosen by the folder's model_index.json; or data.kind="images" online)
3. Train:             python -m swd_jax.train --config configs/flux_dev.py --workdir /runs/flux_dev \
                         --config.model.path=/ckpt/flux_dev --config.data.path=/data/flux_pre
Cost (benchmarks/README.md §5, the TPU compiler's plan, 1024 px = 4096 + 512 tokens, splash attention, remat):
65.4 GiB per v5p chip at 2 images/chip (arguments 10.9: the 11.9 B bf16 base FSDP-sharded over 4 chips, LoRA
and AdamW states), estimated MFU <= 0.48; the reference global batch 64 at 2 images/chip is a v5p-64 slice.
Result: the trained student LoRA in WORKDIR/student_peft (PEFT format, FluxTransformer2DModel names).
"""
import ml_collections

from configs.common import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.model.source = "auto"  # a converted checkpoint (fastest to load) or the diffusers FLUX.1-dev folder
    c.model.kind = "flux"
    c.model.guidance = 4.5  # the student's and fake model's guidance-embedding input (published sampling value)
    c.model.attention_impl = "chunked"
    c.lora.targets = ("to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "proj_mlp", "proj_out")
    c.schedule.preset = ""
    c.schedule.scales = (64, 80, 96, 128)
    c.schedule.boundaries = (0, 7, 14, 18, 28)
    c.schedule.num_train_steps = 28
    c.schedule.shift = 3.0
    c.loss.cfg_teacher = 1.0
    c.loss.guidance_teacher = 4.5
    c.loss.cls_blocks = (26,)
    c.loss.mmd_blocks = (26,)
    c.data.max_sequence_length = 512
    c.train.steps = 3000
    c.train.batch_size = 64
    c.data.kind = "precomputed"
    return c
