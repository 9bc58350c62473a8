"""The default SwD run configuration (reference hyperparameters, SD3.5-Medium); other configs override it."""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Where the frozen base (teacher) weights come from: "auto" (model.path is recognised: a converted checkpoint,
    # a diffusers pipeline or transformer folder), "random" (tiny tests), "diffusers" (a pipeline or transformer
    # folder, converted on load), "converted" (the output of `swd-convert`).
    # remat: rematerialise each block; remat_policy: what it keeps for the backward, "full" (its inputs only, as
    # the reference's gradient checkpointing), "attention" (also the splash kernel's output and log-sum-exp: no
    # attention forward rerun), "dots" (also the matmul outputs) or "dots_attention" (both): less recompute, more
    # memory (swd_jax.models.layers.REMAT_POLICIES); blocks_without_remat: the last this many blocks run without
    # remat (all their activations kept: HBM left over buys speed). scan_blocks: each run of identical blocks is one
    # scan over stacked weights, compiled once (False: every block unrolled, today's program at full depth; the
    # numbers agree to 1e-6 and checkpoints are the same either way, so a resume may switch it).
    # remat_from_scale: remat only at scale intervals whose latent is at least this (one of the schedule's scales;
    # the smaller intervals run without remat: faster, and they need far less memory); 0: at every interval.
    c.model = dict(source="auto", path="", dtype="bfloat16", param_dtype="bfloat16", remat=True, remat_policy="full",
                   blocks_without_remat=0, scan_blocks=True, remat_from_scale=0,
                   # "xla" | "chunked" (any backend, flash-like memory) | "splash" (TPU) | "splash_fused" (TPU,
                   # the kernel's fused backward: dq partial sums in bf16) | "cudnn" (GPU);
                   # attention_chunk: query rows per chunk of "chunked".
                   attention_impl="xla", attention_chunk=512,
                   # Used with source="random" only: the MMDiTConfig fields of a random-weight model.
                   random=ml_collections.ConfigDict(dict(
                       sample_size=16, patch_size=2, in_channels=1, num_layers=4, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                       pooled_projection_dim=16, out_channels=1, pos_embed_max_size=8,
                       dual_attention_layers=(0,), qk_norm="rms_norm")))
    # Reference targets: image-stream attention + both MLPs (PEFT names; see swd_jax.models.layers.LoraConfig).
    c.lora = dict(rank=64, alpha=64.0, init_seed=0,
                  targets=("to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"))
    c.head = dict(num_layers=4)
    c.schedule = dict(preset="sd35_medium_4", scales=(), boundaries=(), num_train_steps=28, shift=3.0)
    # cls_blocks / mmd_blocks: feature blocks of the discriminator and PDM; () = from the depth (11 of 24 as the
    # reference's Medium, 20 of 38 as Large, else 11/24 of the depth).
    c.loss = dict(n_fake_steps=5, dmd_weight=1.0, gan_g_weight=5e-3, gan_d_weight=1e-2, pdm_weight=1.0,
                  cfg_teacher=7.0, cls_blocks=(), mmd_blocks=(), dmd_range=(12, 28), pdm_range=(18, 28),
                  pdm_kernel="linear", pdm_per_sample=True, huber_c=1e-3, rbf_bandwidth=100.0,
                  do_dmd=True, do_gan=True, do_pdm=True)
    c.optim = dict(lr=5e-6, lr_fake=5e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, clip_norm=10.0)
    # data.kind: "digits" (built-in toy), "precomputed" (array_record of latents per scale + text embeddings,
    # from swd-precompute), "images" (image records encoded online by our VAE/text encoders from model.path).
    # data.latent: "sample" (a fresh VAE posterior draw each time an image is used, as the official code) or
    # "mean" (the posterior mean); VAE sources only. data.verify: the start-up check of precomputed shards,
    # "fast" (sizes, row counts, a few records per shard) or "full" (also every shard's checksum). A gs:// path
    # must be mounted (gcsfuse) or, with data.copy_to_local=True, is downloaded to each host's local disk.
    c.data = dict(kind="precomputed", path="", seed=0, max_sequence_length=256, latent="sample", verify="fast",
                  copy_to_local=False)
    c.train = dict(steps=3000, batch_size=64, seed=42, log_every=10, ckpt_every=250, keep=3,
                   sample_every=250, num_samples=8, export_peft=True)
    # The paper's metrics during training (swd_jax/train/evaluation.py): every N steps (0 = off), prompt sets
    # "name:captions.csv[:fid_stats.npz]", samples per set (official 5008), metric models (paths; empty = skip).
    c.eval = dict(every=0, sets=(), num_samples=5008, seed=0, batch=8, inception="", clip="", pickscore="",
                  processor="")
    # Mesh axes (data, fsdp, tensor); -1 takes the remaining devices. Rules map logical axes to mesh axes.
    c.mesh = dict(shape=(1, -1, 1), rules=(
        ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("adaln", "tensor"), ("joint", None),
        ("head_dim", None), ("embed_out", None), ("activation_batch", ("data", "fsdp")),
        ("activation_tokens", None), ("activation_embed", None)))
    return c
