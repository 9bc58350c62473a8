"""The method's public API: every `>>>` example in its docstrings runs and prints what it shows (CPU)."""
import doctest
import importlib
import inspect
import subprocess
import sys

import pytest

MODULES = ["swd_jax", "swd_jax.method.losses", "swd_jax.method.schedule", "swd_jax.method.resize", "swd_jax.method.sampler", "swd_jax.testing"]
# The public functions and classes of the method, each of which must carry a runnable example.
PUBLIC = {
    "swd_jax.method.losses": ["pdm_loss", "pdm_linear", "pdm_rbf", "dmd_grad", "dmd_loss", "gan_discriminator_loss",
                       "gan_generator_loss", "fake_model_loss"],
    "swd_jax.method.schedule": ["flow_match_sigmas", "flow_match_timesteps", "flux_dynamic_sigmas", "add_noise",
                         "ScaleSchedule", "get_schedule"],
    "swd_jax.method.resize": ["area_resize", "bicubic_resize", "bilinear_resize", "resize", "area_matrix",
                       "bicubic_matrix", "bilinear_matrix"],
    "swd_jax.method.sampler": ["scale_wise_sample", "euler_sample", "SamplerNoise", "mmdit_velocity", "flux_velocity"],
    "swd_jax.testing": [],  # its examples are in the module docstring
}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = doctest.DocTestFinder().find(module, name)
    for test in sorted(tests, key=lambda t: t.name):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} doctest examples failed in {name}"
    if PUBLIC.get(name) or name == "swd_jax.testing":
        assert results.attempted > 0, f"{name} has no doctest examples"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_function_has_an_example(name):
    module = importlib.import_module(name)
    missing = [f for f in PUBLIC[name] if ">>>" not in (inspect.getdoc(getattr(module, f)) or "")]
    assert not missing, f"{name}: no >>> example in the docstring of {missing}"
    listed = importlib.import_module("swd_jax").__doc__
    unlisted = [f for f in PUBLIC[name] if f not in listed and not f.endswith("_matrix")]
    assert not unlisted, f"the package docstring of swd_jax does not list {unlisted}"


def test_import_swd_jax_and_testing_stay_light():
    """`import swd_jax` imports nothing heavy; swd_jax.testing imports neither jax nor torch."""
    code = ("import sys, swd_jax, swd_jax.testing; "
            "print(sorted(m for m in ('jax', 'torch', 'flax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
