"""FLUX prompt encoding vs diffusers' FluxPipeline.encode_prompt on tiny encoders and tokenizers built here
(the offline vocabularies of test_prompt_encoding), at FLUX's 512 T5 tokens."""
import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, FluxPipeline

from swd_jax.convert.flux_prompt_encoding import FluxPromptEncoder
from swd_jax.convert.prompt_encoding import SD3PromptEncoder
from tests.test_flux_vae import TINY_FLUX
from tests.test_prompt_encoding import CLIP_MERGES, CLIP_VOCAB, T5_PIECES, _dataset, _save, rel_err

# the last prompt is past CLIP's 77 tokens and T5's 512 (truncated in both)
PROMPTS = ["a low tower", "", "the red lower tower, lowest and newer " * 40]


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("flux")
    vocab = {t: i for i, t in enumerate(CLIP_VOCAB)}
    comps = dict(
        text_encoder=_save(transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2)),
            root / "text_encoder"),
        text_encoder_2=_save(transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=len(T5_PIECES), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=12, feed_forward_proj="gated-gelu")),
            root / "text_encoder_2"),
        tokenizer=transformers.CLIPTokenizer(vocab=vocab, merges=CLIP_MERGES, model_max_length=77),
        tokenizer_2=transformers.T5TokenizerFast(vocab=T5_PIECES, extra_ids=0))
    for name in ("tokenizer", "tokenizer_2"):
        comps[name].save_pretrained(root / name)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    _save(AutoencoderKL(**{k: v for k, v in TINY_FLUX.items() if not k.startswith("_")}), root / "vae")
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "FluxTransformer2DModel", "joint_attention_dim": 32, "pooled_projection_dim": 16}))
    return FluxPipeline(transformer=None, scheduler=None, vae=None, **comps), root


def test_encode_prompt_matches_pipeline(flux):
    pipe, root = flux
    enc = FluxPromptEncoder(str(root))
    with torch.no_grad():
        pe, pooled, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=512)
    ours, ours_pooled = enc.encode_prompt(PROMPTS)
    assert ours.shape == pe.shape == (3, 512, 32) and ours_pooled.shape == pooled.shape == (3, 16)
    assert rel_err(ours, pe) < 1e-5 and rel_err(ours_pooled, pooled) < 1e-5
    assert not text_ids.any()  # zeros: Flux builds them itself
    ids = enc.tokenize(PROMPTS)
    assert ids["clip_l"].shape == (3, 77) and ids["t5"].shape == (3, 512)
    assert ids["t5"][2, -1] == 1 and ids["t5"][0, -1] == 0  # truncated prompt ends in </s>, short one in <pad>
    short = FluxPromptEncoder(str(root), max_sequence_length=24)  # shorter T5 runs: a prefix of the tokens
    with torch.no_grad():
        pe24, _, _ = pipe.encode_prompt(PROMPTS[:2], max_sequence_length=24)
    assert rel_err(short.encode_prompt(PROMPTS[:2])[0], pe24) < 1e-5


def test_bad_folders(flux, tmp_path):
    _, root = flux
    partial = tmp_path / "partial"
    shutil.copytree(root, partial, ignore=shutil.ignore_patterns("tokenizer_2"))
    with pytest.raises(FileNotFoundError, match=r"FLUX checkpoint folder .* lacks component folder\(s\) "
                                                r"\['tokenizer_2'\]"):
        FluxPromptEncoder(str(partial))
    shutil.copytree(root / "tokenizer_2", partial / "tokenizer_2")
    with pytest.raises(ValueError, match="max_sequence_length must be in 1..512"):
        FluxPromptEncoder(str(partial), max_sequence_length=513)
    cfg = json.loads((partial / "transformer" / "config.json").read_text())
    (partial / "transformer" / "config.json").write_text(json.dumps({**cfg, "pooled_projection_dim": 768}))
    with pytest.raises(ValueError, match="pooled_projection_dim=768 but the CLIP-L width hidden_size=16"):
        FluxPromptEncoder(str(partial))
    for name in ("text_encoder_3", "tokenizer_3"):
        (partial / name).mkdir()
    with pytest.raises(ValueError, match="text_encoder_2/config.json: unsupported config fields"):
        SD3PromptEncoder(str(partial))  # the SD3 loader on a FLUX folder: its T5 is no CLIP-G
    cfg = json.loads((partial / "text_encoder" / "config.json").read_text())
    (partial / "text_encoder" / "config.json").write_text(json.dumps(
        {**cfg, "architectures": ["CLIPTextModelWithProjection"]}))
    with pytest.raises(ValueError, match="FLUX's is a CLIPTextModel"):
        FluxPromptEncoder(str(partial))


def test_precompute_a_flux_folder(flux, tmp_path):
    """swd_jax.cli.precompute on a FLUX pipeline folder: FLUX's prompt embeddings and FLUX-normalised VAE moments."""
    import jax

    from swd_jax.train.precompute import precompute
    from swd_jax.train.records import decode_array_record, decode_image, open_source

    pipe, root = flux
    data, out = _dataset(tmp_path / "data", 3), tmp_path / "out"
    kw = dict(shard_size=4, dtype="float32", param_dtype="float32", store_dtype="float32", devices=jax.devices()[:1],
              progress=False, max_sequence_length=512)
    assert precompute(str(root), str(data), str(out), (4, 8), **kw) == {"written": 3, "skipped_shards": 0, "bad": 0}
    records = [decode_array_record(open_source(str(out)).records[i]) for i in range(3)]
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt([r["prompt"] for r in records], max_sequence_length=512)
        uncond, _, _ = pipe.encode_prompt([""], max_sequence_length=512)
        ref_vae = AutoencoderKL.from_pretrained(str(root / "vae"))
        img = torch.stack([torch.from_numpy(decode_image((data / f"{i}.png").read_bytes(), None, "float32"))
                           for i in range(3)]).permute(0, 3, 1, 2)
        mean = ref_vae.encode(torch.nn.functional.interpolate(img, size=8, mode="area")).latent_dist.mean
    assert rel_err(np.stack([r["prompt_embeds"] for r in records]), embeds) < 1e-5
    assert rel_err(np.stack([r["pooled_prompt_embeds"] for r in records]), pooled) < 1e-5
    with np.load(out / "uncond.npz") as z:
        assert z["prompt_embeds"].shape == (1, 512, 32) and rel_err(z["prompt_embeds"], uncond) < 1e-5
    want = (mean.permute(0, 2, 3, 1).numpy() - 0.1159) * 0.3611  # FLUX's shift and scaling factors
    assert rel_err(np.stack([r["mean_4"] for r in records]), want) < 1e-5
