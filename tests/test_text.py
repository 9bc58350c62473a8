"""CLIP (quick-GELU and GELU) and T5 v1.1 encoders: tiny transformers models -> safetensors -> ours, fp32 1e-5."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from swd_jax.convert.text import clip_config_from_dict, load_clip, load_t5, t5_config_from_dict
from swd_jax.models import text as text_lib


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the relative error every parity test here asserts."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _perturb_and_save(model, folder):
    with torch.no_grad():  # non-trivial norms too, so every mapping is exercised
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval().save_pretrained(folder)
    return model


def _clip(tmp_path_factory, act, eos):
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, projection_dim=24,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                      hidden_act=act, eos_token_id=eos, bos_token_id=97, pad_token_id=1)
    folder = str(tmp_path_factory.mktemp(f"clip_{act}"))
    ref = _perturb_and_save(transformers.CLIPTextModelWithProjection(cfg), folder)
    return ref, folder, *load_clip(folder)


@pytest.mark.parametrize("act,eos", [("quick_gelu", 2), ("gelu", 98)])
def test_clip_matches_transformers(tmp_path_factory, act, eos):
    ref, _, model, params = _clip(tmp_path_factory, act, eos)
    assert model.config.hidden_act == act and model.config.eos_token_id == eos
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (3, 16), generator=g)
    ids[0, 5], ids[1, 9], ids[2, 15] = 98, 98, 98  # EOS: the highest id, and an id to find
    ids[1, 12] = 98  # a second EOS after the first one
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # right padding after the first sequence's EOS
    for m in (None, mask):
        with torch.no_grad():
            out = ref(ids, attention_mask=m, output_hidden_states=True)
        ours = model.apply({"params": params}, jnp.asarray(ids.numpy()),
                           None if m is None else jnp.asarray(m.numpy()))
        assert len(ours["hidden_states"]) == len(out.hidden_states) == 3
        for a, b in zip(ours["hidden_states"], out.hidden_states):
            assert rel_err(a, b) < 1e-5
        assert rel_err(ours["last_hidden_state"], out.last_hidden_state) < 1e-5
        assert rel_err(ours["text_embeds"], out.text_embeds) < 1e-5


def _t5(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                feed_forward_proj="gated-gelu")
    folder = str(tmp_path_factory.mktemp("t5"))
    ref = _perturb_and_save(transformers.T5EncoderModel(cfg), folder)
    return ref, folder


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    ref, folder = _t5(tmp_path_factory)
    return ref, folder, *load_t5(folder)


def test_t5_matches_transformers(t5):
    ref, _, model, params = t5
    ids = torch.randint(2, 99, (2, 20), generator=torch.Generator().manual_seed(1))  # 20 > max_distance: log buckets
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    for m in (None, mask):
        with torch.no_grad():
            want = ref(ids, attention_mask=m).last_hidden_state
        got = model.apply({"params": params}, jnp.asarray(ids.numpy()), None if m is None else jnp.asarray(m.numpy()))
        assert got.dtype == jnp.float32 and rel_err(got, want) < 1e-5


def test_t5_position_buckets_match_transformers():
    rel = torch.arange(-700, 701)[None, :]
    want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=32, max_distance=128)
    got = text_lib.relative_position_bucket(rel.numpy(), 32, 128)
    np.testing.assert_array_equal(got, want.numpy())


def test_t5_half_precision(t5):
    _, _, model, params = t5
    ids = jnp.arange(2, 14)[None]
    full = model.apply({"params": params}, ids)
    bf16 = text_lib.T5EncoderModel(model.config, dtype=jnp.bfloat16).apply({"params": params}, ids)
    assert bf16.dtype == jnp.float32 and rel_err(bf16, full) < 5e-2
    with pytest.raises(ValueError, match="float16"):
        text_lib.T5EncoderModel(model.config, dtype=jnp.float16).apply({"params": params}, ids)


def test_bad_configs_and_checkpoints(t5, tmp_path):
    ref, folder, model, params = t5
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5_config_from_dict({**raw, "feed_forward_proj": "relu"})
    with pytest.raises(ValueError, match=r"unsupported config fields \['rope_theta'\]"):
        t5_config_from_dict({**raw, "rope_theta": 1.0})
    with pytest.raises(ValueError, match="hidden_act"):
        clip_config_from_dict({"hidden_act": "relu"})
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        clip_config_from_dict({"architectures": ["CLIPVisionModel"]})  # CLIPTextModel is FLUX's, accepted
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_t5(str(tmp_path))
    # tied embedding saved twice: accepted when equal, named when not; a missing layer norm is named
    sd = {k: v.clone().contiguous() for k, v in ref.state_dict().items()}
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"].clone()
    for name, change in (("tied_ok", None), ("tied_bad", "shared"), ("missing", "norm")):
        d = tmp_path / name
        d.mkdir()
        s = dict(sd)
        if change == "shared":
            s["encoder.embed_tokens.weight"] = s["shared.weight"] + 1
        if change == "norm":
            del s["encoder.final_layer_norm.weight"]
        save_file(s, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(raw))
        if change is None:
            _, p2 = load_t5(str(d))
            np.testing.assert_array_equal(p2["shared"]["embedding"], params["shared"]["embedding"])
        else:
            with pytest.raises(ValueError, match="tied keys with different values.*embed_tokens"
                               if change == "shared" else "encoder/final_layer_norm/scale"):
                load_t5(str(d))
