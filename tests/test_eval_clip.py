"""CLIP / PickScore scorer: tiny random transformers CLIPModel -> safetensors -> ours; embeddings and the
official `calc_pick_and_clip_scores` cosine within 1e-5 (fp32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from swd_jax.convert.clip import clip_model_config_from_dict, load_clip_model
from swd_jax.eval.scores import ClipScorer, cosine_scores


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _tiny_config(**text_kw):
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, hidden_act="quick_gelu", eos_token_id=98, bos_token_id=97,
                pad_token_id=1, **text_kw)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=4, hidden_act="gelu")
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    ref = transformers.CLIPModel(_tiny_config()).eval()
    with torch.no_grad():  # non-trivial norms, class token, logit scale: every mapping exercised
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = str(tmp_path_factory.mktemp("clip"))
    ref.save_pretrained(folder)
    model, params = load_clip_model(folder)
    return ref, folder, model, params


def _inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    ids = torch.randint(3, 96, (n, 16), generator=g)
    mask = torch.ones_like(ids)
    for b in range(n):  # EOS then right padding (as a `padding=True` processor output)
        end = 4 + (3 * b) % 12
        ids[b, end], ids[b, end + 1:], mask[b, end + 1:] = 98, 1, 0
    return pixels, ids, mask


def test_embeddings_match_transformers(tiny):
    ref, _, model, params = tiny
    pixels, ids, mask = _inputs()
    with torch.no_grad():
        img = ref.get_image_features(pixel_values=pixels).pooler_output
        txt = ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    x = jnp.asarray(pixels.permute(0, 2, 3, 1).numpy())
    apply = jax.jit(model.apply, static_argnames="method")
    ours_img = apply({"params": params}, x, method=model.get_image_features)
    ours_txt = apply({"params": params}, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()),
                     method=model.get_text_features)
    assert ours_img.shape == (3, 24) and ours_txt.shape == (3, 24)
    assert rel_err(ours_img, img) < 1e-5
    assert rel_err(ours_txt, txt) < 1e-5
    assert abs(float(params["logit_scale"]) - float(ref.logit_scale)) < 1e-7


def _official_scores(model, image_inputs, text_inputs, batch_size=2):
    """yandex-research/swd `calc_pick_and_clip_scores`, without CUDA autocast."""
    scores = torch.zeros(len(image_inputs))
    for i in range(0, len(image_inputs), batch_size):
        with torch.no_grad():
            image_embs = model.get_image_features(image_inputs[i:i + batch_size]).pooler_output
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(input_ids=text_inputs["input_ids"][i:i + batch_size],
                                                attention_mask=text_inputs["attention_mask"][i:i + batch_size])
            text_embs = text_embs.pooler_output / torch.norm(text_embs.pooler_output, dim=-1, keepdim=True)
        scores[i:i + batch_size] = (text_embs * image_embs).sum(-1)
    return scores.numpy()


def test_scores_match_official_function(tiny):
    ref, folder, model, params = tiny
    pixels, ids, mask = _inputs(n=5, seed=2)
    want = _official_scores(ref, pixels, {"input_ids": ids, "attention_mask": mask})
    x, i, m = pixels.permute(0, 2, 3, 1).numpy(), ids.numpy(), mask.numpy()
    direct = jax.jit(lambda p, *a: cosine_scores(model, p, *a))(params, x, i, m)
    assert np.abs(np.asarray(direct) - want).max() < 1e-5
    scorer = ClipScorer(folder, batch_size=2)  # 5 pairs: the last batch is padded
    got = scorer.score(x, i, m)
    assert got.shape == (5,) and np.abs(got - want).max() < 1e-5


def test_legacy_config_fields_and_overrides():
    """transformers 4.2x configs (laion's, PickScore's): generic fields in sub-configs, `*_config_dict`."""
    raw = _tiny_config().to_dict()
    raw["text_config"].update(top_k=50, bad_words_ids=None, chunk_size_feed_forward=0, projection_dim=512)
    raw["text_config_dict"] = {"hidden_act": "gelu"}
    raw["vision_config_dict"] = {"layer_norm_eps": 1e-6}
    cfg = clip_model_config_from_dict(raw)
    assert cfg.text.hidden_act == "gelu" and cfg.vision.layer_norm_eps == 1e-6
    assert cfg.projection_dim == cfg.text.projection_dim == 24 and cfg.vision.patch_size == 4
    raw["vision_config"]["use_flash"] = True
    with pytest.raises(ValueError, match="use_flash"):
        clip_model_config_from_dict(raw)


def test_converter_is_strict(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file
    _, folder, _, _ = tiny
    tensors = load_file(f"{folder}/model.safetensors")
    tensors.pop("visual_projection.weight")
    tensors["vision_model.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(f"{folder}/config.json").read())
    with pytest.raises(ValueError, match=r"(?s)vision_model\.extra.*missing.*visual_projection/kernel"):
        load_clip_model(str(tmp_path))
