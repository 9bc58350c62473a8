"""Config checks that run before anything is loaded or compiled: values in range, and what a resume may change.

`check_values(c)` raises a ConfigError naming the field for any value that cannot make a run (steps <= 0,
batch_size 0, rank 0, an empty or reversed range, ...). `resume_changes(recorded, current)` sorts the differences
between a run's recorded config.json and the config of a resume: fields that only change logging, cadence or the
length of the run pass (and are recorded); any other change alters what the run trains or means and is refused
unless the user allows it explicitly.
"""
from __future__ import annotations

import json
import math

from swd_jax.train.config_loading import ConfigError, flat_fields

# Fields a resume may change freely: they do not alter the trained state or what it means.
HARMLESS_PREFIXES = ("train.log_every", "train.ckpt_every", "train.keep", "train.sample_every", "train.num_samples",
                     "train.export_peft", "eval.", "model.attention_impl", "model.attention_chunk", "model.remat",
                     "model.blocks_without_remat", "model.remat_from_scale", "model.scan_blocks", "data.verify",
                     "data.copy_to_local", "mesh.")
# Fields that ask for an action on this run only (set by command-line flags); never compared on a resume.
ACTIONS = ("train.restart_from_scratch",)
# The Linear layers that can carry LoRA, by their diffusers module path below a block (MMDiT and FLUX); a target
# is a PEFT suffix of such a path ("to_q", "attn.to_q", "ff.net.2", "transformer_blocks.0.attn.to_q").
LORA_LAYERS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
               "norm.linear", "norm1.linear", "norm1_context.linear", "norm_out.linear", "x_embedder",
               "context_embedder", "time_text_embed.text_embedder.linear_1",
               "time_text_embed.text_embedder.linear_2", "time_text_embed.timestep_embedder.linear_1",
               "time_text_embed.timestep_embedder.linear_2")


def _require(ok: bool, field: str, value, what: str) -> None:
    if not ok:
        raise ConfigError(f"{field}={value!r}: {what}")


def check_values(c) -> None:
    """Every numeric field in its range; raises ConfigError naming the first bad field."""
    t, lo, o, lora = c.train, c.loss, c.optim, c.lora
    _require(t.steps >= 1, "train.steps", t.steps, "must be at least 1")
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be at least 1")
    for name in ("log_every", "ckpt_every", "keep"):
        _require(t[name] >= 1, f"train.{name}", t[name], "must be at least 1")
    _require(t.sample_every >= 0, "train.sample_every", t.sample_every, "must be 0 (off) or more")
    _require(t.num_samples >= 1, "train.num_samples", t.num_samples, "must be at least 1")
    _require(lora.rank >= 1, "lora.rank", lora.rank, "must be at least 1")
    _require(lora.alpha > 0, "lora.alpha", lora.alpha, "must be positive")
    _require(len(lora.targets) >= 1, "lora.targets", tuple(lora.targets), "name at least one module")
    unknown = [t for t in lora.targets if not _lora_layer(str(t))]
    _require(not unknown, "lora.targets", tuple(lora.targets),
             f"{unknown} name no Linear layer that can carry LoRA; valid targets (diffusers module names, or any "
             "longer suffix of a module path): to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, "
             "to_add_out, net.0.proj, net.2; FLUX also proj_mlp, proj_out, linear, linear_1, linear_2, x_embedder, "
             "context_embedder")
    _require(c.model.blocks_without_remat >= 0, "model.blocks_without_remat", c.model.blocks_without_remat,
             "must be 0 (every block under remat) or more")
    _require(c.head.num_layers >= 1, "head.num_layers", c.head.num_layers, "must be at least 1")
    n = c.schedule.num_train_steps
    _require(n >= 1, "schedule.num_train_steps", n, "must be at least 1")
    for name in ("dmd_range", "pdm_range"):
        r = tuple(lo[name])
        _require(len(r) == 2 and 0 <= r[0] < r[1] <= n, f"loss.{name}", r,
                 f"must be (low, high) with 0 <= low < high <= {n} (timestep indices, high exclusive)")
    if lo.do_dmd:
        _require(lo.n_fake_steps >= 1, "loss.n_fake_steps", lo.n_fake_steps, "must be at least 1 when do_dmd")
    _require(lo.n_fake_steps >= 0, "loss.n_fake_steps", lo.n_fake_steps, "must be 0 or more")
    for name in ("dmd_weight", "gan_g_weight", "gan_d_weight", "pdm_weight", "huber_c", "rbf_bandwidth"):
        _require(lo[name] >= 0, f"loss.{name}", lo[name], "must be 0 or more")
    _require(lo.cfg_teacher >= 1.0, "loss.cfg_teacher", lo.cfg_teacher, "must be at least 1 (1 = no guidance)")
    _require(lo.do_dmd or lo.do_gan or lo.do_pdm, "loss.do_dmd/do_gan/do_pdm", False, "turn on at least one loss")
    for name in ("lr", "lr_fake", "clip_norm"):
        _require(math.isfinite(o[name]) and o[name] > 0, f"optim.{name}", o[name], "must be finite and positive")
    _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1/b2", (o.b1, o.b2), "must be in [0, 1)")
    if "eval" in c:
        _require(c.eval.every >= 0, "eval.every", c.eval.every, "must be 0 (off) or more")
        _require(c.eval.num_samples >= 1, "eval.num_samples", c.eval.num_samples, "must be at least 1")
        _require(c.eval.batch >= 1, "eval.batch", c.eval.batch, "must be at least 1")
    _require(len(tuple(c.mesh.shape)) == 3, "mesh.shape", tuple(c.mesh.shape), "must be (data, fsdp, tensor)")


def _lora_layer(target: str) -> bool:
    return any(n == target or n.endswith("." + target) or target.endswith("." + n) for n in LORA_LAYERS)


def training_changes(changes: list[str]) -> list[str]:
    """The 'field: old -> new' lines of `resume_changes` that alter how the run trains (not the harmless ones, nor a
    longer train.steps)."""
    return [line for line in changes if not _harmless(line.split(":", 1)[0]) and not line.startswith("train.steps:")]


def _harmless(field: str) -> bool:
    return any(field == p or (p.endswith(".") and field.startswith(p)) for p in HARMLESS_PREFIXES)


def _normal(v):
    return json.loads(json.dumps(v, default=str))  # tuples and lists compare equal, as in config.json


def resume_changes(recorded: dict, current) -> tuple[list[str], list[str]]:
    """(refused, allowed): 'field: old -> new' for each difference between a recorded config and `current`.

    `recorded` is the parsed config.json of the run. train.steps may grow (the run goes on); lowering it below
    the recorded value is refused (it would end, and export, a run that went further).
    """
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    old, new = flat(recorded), {k: _normal(v) for k, v in flat_fields(current).items()}
    refused, allowed = [], []
    for field in sorted(set(old) | set(new)):
        a, b = old.get(field, "<absent>"), new.get(field, "<absent>")
        if a == b or field in ACTIONS:
            continue
        line = f"{field}: {a!r} -> {b!r}"
        if field == "train.steps" and isinstance(a, int) and isinstance(b, int):
            (allowed if b >= a else refused).append(line)
        elif _harmless(field):
            allowed.append(line)
        else:
            refused.append(line)
    return refused, allowed
