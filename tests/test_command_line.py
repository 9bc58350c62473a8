"""The command lines as a user meets them: configs from anywhere, strict overrides, --help, one-line errors, resume."""
import json
import os

import pytest

from configs.common import base_config
from swd_jax.cli.common import run_main
from swd_jax.train.config_checks import check_values, resume_changes
from swd_jax.train.config_loading import ConfigError, apply_overrides, load_config


def test_configs_load_by_name_and_path_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: `configs` is not importable from here by itself
    by_name = load_config("sd35_medium")
    repo_configs = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
    by_path = load_config(os.path.join(repo_configs, "sd35_medium.py"))
    assert by_name.to_dict() == by_path.to_dict() and by_name.schedule.preset == "sd35_medium_4"
    assert load_config("configs/tiny.py").model.source == "random"  # the README's relative path, from elsewhere
    own = tmp_path / "mine.py"
    own.write_text("from configs.common import base_config\n\ndef get_config():\n    c = base_config()\n"
                   "    c.train.steps = 7\n    return c\n")
    assert load_config(str(own)).train.steps == 7
    with pytest.raises(ConfigError, match=r"no config named 'sd35_medum'; did you mean sd35_medium"):
        load_config("sd35_medum")


def test_overrides_replace_parse_types_and_name_close_fields():
    c = base_config()
    apply_overrides(c, ["--config.schedule.scales=8,12,16", "--config.schedule.scales=16,32",  # replaces
                        "--config.train.steps", "7", "--config.model.remat=false", "--config.optim.lr=1e-5",
                        "--config.lora.targets=to_q,to_k", "--config.loss.dmd_range=(3, 9)"])
    assert c.schedule.scales == (16, 32) and c.train.steps == 7 and c.model.remat is False
    assert c.optim.lr == 1e-5 and c.lora.targets == ("to_q", "to_k") and c.loss.dmd_range == (3, 9)
    for args, pattern in ((["--config.train.stpes=3"], r"^unknown config field 'train.stpes'; did you mean train.steps"),
                          (["--config.train.lr=1e-5"], r"^unknown config field 'train.lr'; did you mean optim.lr"),
                          (["--config.train.steps=abc"], r"^--config.train.steps='abc': not a valid int"),
                          (["--workdir2=x"], r"^unrecognised argument '--workdir2=x'")):
        with pytest.raises(ConfigError, match=pattern) as e:
            apply_overrides(base_config(), args)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("field,value,pattern", [
    ("train.steps", -5, r"train.steps=-5: must be at least 1"),
    ("train.batch_size", 0, r"train.batch_size=0"),
    ("train.log_every", 0, r"train.log_every=0"),
    ("lora.rank", 0, r"lora.rank=0"),
    ("lora.targets", (), r"lora.targets=\(\): name at least one module"),
    ("loss.dmd_range", (20, 10), r"loss.dmd_range=\(20, 10\): must be \(low, high\) with 0 <= low < high <= 28"),
    ("loss.n_fake_steps", 0, r"loss.n_fake_steps=0: must be at least 1 when do_dmd"),
    ("optim.lr", 0.0, r"optim.lr=0.0: must be finite and positive"),
])
def test_bad_values_are_refused_before_anything_compiles(field, value, pattern):
    c = base_config()
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=pattern):
        check_values(c)


def test_resume_refuses_changes_of_meaning_and_records_harmless_ones():
    recorded = json.loads(base_config().to_json_best_effort())
    c = base_config()
    c.train.steps, c.train.log_every, c.train.sample_every = 4000, 1, 0  # harmless: longer run, cadence
    refused, allowed = resume_changes(recorded, c)
    assert refused == [] and len(allowed) == 3
    c.train.batch_size, c.schedule.preset, c.lora.rank, c.loss.dmd_weight = 32, "sd35_medium_6", 8, 0.5
    refused, _ = resume_changes(recorded, c)
    assert [r.split(":")[0] for r in refused] == ["lora.rank", "loss.dmd_weight", "schedule.preset",
                                                  "train.batch_size"]
    c = base_config()
    c.train.steps = 100  # fewer steps than the run was started with: would end (and export) a shorter run
    assert resume_changes(recorded, c)[0] == ["train.steps: 3000 -> 100"]


def test_resume_check_in_the_workdir(tmp_path):
    from swd_jax.train.loop import _check_resume_config, _record_config
    c = base_config()
    _record_config(c, str(tmp_path), 0, [])
    c.train.batch_size = 32
    with pytest.raises(ValueError, match=r"train.batch_size: 64 -> 32\. Use a new --workdir, or pass "
                                         r"--allow-config-change"):
        _check_resume_config(c, str(tmp_path), allow=False)
    changes = _check_resume_config(c, str(tmp_path), allow=True)
    _record_config(c, str(tmp_path), 10, changes)
    history = [json.loads(line) for line in open(tmp_path / "config_history.jsonl")]
    assert history == [{"resumed_at_step": 10, "changes": ["train.batch_size: 64 -> 32"]}]
    assert json.load(open(tmp_path / "config.json"))["train"]["batch_size"] == 32


def _console_scripts() -> dict[str, str]:
    import tomllib
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(_console_scripts()))
def test_every_command_exits_0_on_help_with_its_name_and_the_common_flags(name, capsys):
    import importlib
    module, func = _console_scripts()[name].split(":")
    try:
        rc = getattr(importlib.import_module(module), func)(["--help"])
    except SystemExit as e:  # argparse's own --help
        rc = e.code
    out = capsys.readouterr().out
    assert rc in (0, None) and out.startswith(f"usage: {name} "), out[:200]
    assert "--debug" in out and "--verbose" in out


def test_user_errors_are_one_line_and_exit_2(capsys):
    def bad():
        raise FileNotFoundError("no such checkpoint\n  at /x")
    assert run_main(bad) == 2
    assert capsys.readouterr().err == "error: no such checkpoint at /x\n"
    with pytest.raises(FileNotFoundError):
        run_main(bad, debug=True)


def test_model_path_is_recognised_and_mismatches_are_named(tmp_path):
    from swd_jax.train.setup import check_schedule_fits, default_feature_block, model_source
    from swd_jax.models.mmdit import MMDiTConfig
    from swd_jax.method.schedule import get_schedule
    pipe, conv, tr = tmp_path / "pipe", tmp_path / "conv", tmp_path / "tr"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    (conv / "params").mkdir(parents=True)
    (conv / "conversion.json").write_text("{}")
    tr.mkdir()
    (tr / "config.json").write_text("{}")
    (tr / "diffusion_pytorch_model.safetensors").write_text("")
    assert [model_source("auto", str(p)) for p in (pipe, conv, tr)] == ["diffusers", "converted", "diffusers"]
    with pytest.raises(ValueError, match=r"is a diffusers pipeline folder, but model.source='converted': set "
                                         r"--config.model.source=auto"):
        model_source("converted", str(pipe))
    with pytest.raises(FileNotFoundError, match="is neither a converted checkpoint"):
        model_source("auto", str(tmp_path))
    assert [default_feature_block(n) for n in (24, 38, 4, 12, 1)] == [11, 20, 2, 6, 0]
    small = MMDiTConfig(sample_size=16, patch_size=2, pos_embed_max_size=16, num_layers=2)
    with pytest.raises(ValueError, match=r"do not fit this model: \[64, 80, 96, 128\] are not multiples of patch 2 up to 32 .*"
                                         r"presets that fit: none; e\.g\. --config\.schedule\.preset= "
                                         r"--config\.schedule\.scales=16,24,32 --config\.schedule\.boundaries=0,7,14,28"):
        check_schedule_fits(get_schedule("sd35_medium_4"), small)
