"""Every shipped config loads, and its schedule, losses and model choice are consistent."""
import importlib

import pytest

from swd_jax.method.schedule import make_schedule
from swd_jax.train.setup import loss_config

CONFIGS = ["tiny", "sd35_medium", "sd35_large", "digits_demo", "flux_dev"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_consistent(name):
    c = importlib.import_module(f"configs.{name}").get_config()
    schedule = make_schedule(c)
    loss = loss_config(c)
    assert schedule.num_intervals >= 2
    assert loss.cls_blocks and loss.mmd_blocks
    assert c.train.batch_size > 0 and c.train.steps > 0


def test_reference_hyperparameters():
    m = importlib.import_module("configs.sd35_medium").get_config()
    assert make_schedule(m).scales == (64, 80, 96, 128) and make_schedule(m).boundaries == (0, 7, 14, 18, 28)
    assert (m.loss.cfg_teacher, m.loss.cls_blocks, m.optim.lr, m.lora.rank) == (7.0, (11,), 5e-6, 64)
    large = importlib.import_module("configs.sd35_large").get_config()
    assert (large.loss.cfg_teacher, large.loss.cls_blocks, large.train.steps) == (4.5, (20,), 4000)


def test_schedule_and_preset_conflict_is_an_error():
    c = importlib.import_module("configs.sd35_medium").get_config()
    c.schedule.scales = (64, 128)
    with pytest.raises(ValueError, match="either `preset` or `scales`"):
        make_schedule(c)
