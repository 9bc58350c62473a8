"""FID Inception: pytorch-fid's InceptionV3 (random weights, its own FID blocks) -> .pth -> ours, fp32 1e-5."""
import jax
import numpy as np
import pytest
import torch

from tests import torchvision_inception

pfi, _ = torchvision_inception.import_pytorch_fid()  # CI: pip install --no-deps pytorch-fid

from swd_jax.convert.inception import load_inception, main as convert_main  # noqa: E402


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """pytorch-fid's `InceptionV3([3])` built by its own `fid_inception_v3()` (the weight download replaced
    by random weights) and its state dict saved as the .pth file users have."""
    captured = {}
    mp = pytest.MonkeyPatch()
    orig = pfi.fid_inception_v3
    mp.setattr(pfi, "fid_inception_v3", lambda: captured.setdefault("net", orig()))
    mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: None)
    mp.setattr(torchvision_inception.Inception3, "load_state_dict", lambda self, sd, *a, **k: None, raising=False)
    try:
        ref = pfi.InceptionV3([3], use_fid_inception=True).eval()
    finally:
        mp.undo()
    net = captured["net"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("conv.weight"):
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
            elif name.endswith(("bn.weight", "running_var")):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith(("bn.bias", "running_mean")) or name.startswith("fc."):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    path = str(tmp_path_factory.mktemp("inception") / "pt_inception-random.pth")
    torch.save(net.state_dict(), path)
    return ref, path


def _torch_features(ref, x_BHWC, resize: bool):
    ref.resize_input = resize
    with torch.no_grad():
        return ref(torch.from_numpy(x_BHWC).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()


def test_features_match_pytorch_fid_small_input(reference):
    ref, path = reference
    model, params = load_inception(path, resize_input=False)
    x = np.random.default_rng(0).uniform(size=(2, 83, 91, 3)).astype(np.float32)  # odd sizes: every pool edge
    ours = jax.jit(model.apply)({"params": params}, x)
    theirs = _torch_features(ref, x, resize=False)
    assert ours.shape == theirs.shape == (2, 2048)
    assert rel_err(ours, theirs) < 1e-5


def test_features_match_pytorch_fid_with_resize_to_299(reference, tmp_path):
    """pytorch-fid's default path: bilinear resize to 299 (here from 64 px) and [0, 1] -> [-1, 1]; also read
    from a .safetensors copy made by the converter's command line (no torch needed then)."""
    ref, path = reference
    st = str(tmp_path / "inception.safetensors")
    convert_main([path, st])
    model, params = load_inception(st)
    x = np.random.default_rng(1).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    assert rel_err(jax.jit(model.apply)({"params": params}, x), _torch_features(ref, x, resize=True)) < 1e-5


def test_converter_is_strict(reference, tmp_path):
    _, path = reference
    sd = torch.load(path, weights_only=True)
    bad = dict(sd)
    bad.pop("Mixed_6b.branch7x7_2.bn.running_var")
    bad["Mixed_6b.extra.conv.weight"] = torch.zeros(1)
    p = str(tmp_path / "bad.pth")
    torch.save(bad, p)
    with pytest.raises(ValueError, match=r"(?s)Mixed_6b\.extra.*missing.*Mixed_6b/branch7x7_2/bn/var"):
        load_inception(p)
    bad = dict(sd, **{"fc.weight": torch.zeros(1000, 2048)})  # torchvision's ImageNet head: not the FID net
    torch.save(bad, p)
    with pytest.raises(ValueError, match="fc.weight"):
        load_inception(p)
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        load_inception(str(tmp_path / "missing.pth"))
