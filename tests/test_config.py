"""One LPL configuration end to end (lpl_ext.LPLConfig) and one log-key schema
(LPLObjective.log_keys).

- LPLConfig validates every option once; the trainer's flags, LPLObjective's keywords and
  the drop-in's reference-named arguments and attributes all go through it, and their
  errors are the same message with the option spelled as each caller spells it;
- the trainer's LPL flags are generated from its fields (defaults, choices, help);
- the objective's logs always carry exactly log_keys(num_layers - 1), in order; the
  trainer's metric names come from the same schema, and StepMetrics refuses a name it does
  not know (tests/test_train_sdxl_lpl.py, tests/test_trainer_flags.py).

Oracles: the option table of docs/spec.md ("Training integration", "Loss module") as the
defaults below, and the objects' own outputs compared across the three entry points.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

import train_sdxl_lpl as tr
from lpl_ext import LatentPerceptualLoss, LPLConfig, LPLObjective
from lpl_ext.config import FIELDS, fields_of, flag_names
from lpl_ext.lpl_loss import REFERENCE_NAMES
from reference_lpl import tiny_vae
from test_objective import make_batch


@pytest.fixture(scope="module")
def vae():
    return tiny_vae("sdxl_like", seed=4)


# ---------------------------------------------------------------- one configuration

# Bad values, one per option that has a check (field, value, exception).
BAD = [
    ("loss_type", "huber", ValueError), ("norm_type", "layer", ValueError), ("num_blocks", 5, ValueError),
    ("num_blocks", -1, ValueError), ("num_blocks", 2.0, ValueError), ("feature_type", "pixels", ValueError),
    ("reference_compat", "yes", TypeError), ("checkpoint_granularity", "layer", ValueError),
    ("t_threshold", -1, ValueError), ("t_threshold", "200", TypeError), ("snr_gamma", 0.0, ValueError),
    ("start_step", -2, ValueError), ("start_step", 1.5, TypeError), ("sync_free", 1, TypeError),
    ("capacity", 0, ValueError), ("capacity", 2.0, TypeError),
]


def _with_dependencies(field, value):
    """The option with what it needs to be checked alone (capacity needs sync_free)."""
    return {field: value, **({"sync_free": True} if field == "capacity" else {})}


@pytest.mark.parametrize("field,value,error", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_every_entry_point_raises_the_configs_message_in_its_own_names(vae, field, value, error):
    """LPLConfig, LPLObjective, the drop-in (reference names) and the trainer (flags): one
    check, one message, the option spelled as each caller spells it."""
    options = _with_dependencies(field, value)
    with pytest.raises(error) as config_error:
        LPLConfig(**options)
    message = str(config_error.value)
    assert message.startswith(field)
    with pytest.raises(error) as objective_error:
        LPLObjective(vae, **options)
    assert str(objective_error.value) == message

    if field in fields_of("loss"):
        argument = REFERENCE_NAMES[field][0]
        with pytest.raises(error) as loss_error:
            LatentPerceptualLoss(vae, **{REFERENCE_NAMES.get(f, (f,))[0]: v for f, v in options.items()})
        assert str(loss_error.value) == message.replace(field, argument)

    flags = flag_names()
    if field in flags:
        args = tr.parse_args([])
        for f, v in options.items():
            setattr(args, flags[f], v)
        with pytest.raises(error) as flag_error:
            tr.lpl_config(args)
        spelled = str(flag_error.value)
        for f in sorted(flags, key=lambda f: len(flags[f]), reverse=True):  # back to field names
            spelled = spelled.replace(f"--{flags[f]}", f)
        assert spelled == message


def test_cross_option_messages_name_both_options_in_each_spelling(capsys):
    with pytest.raises(ValueError, match=r"^scale weights LPL .* needs snr_gamma.*Set snr_gamma or drop scale"):
        LPLConfig(scale=True)
    with pytest.raises(ValueError, match=r"^capacity sets the decoder batch of sync_free; add sync_free or drop "
                                         r"capacity"):
        LPLConfig(capacity=2)
    with pytest.raises(SystemExit):
        tr.parse_args(["--lpl_scale"])
    assert "--lpl_scale weights LPL by min(SNR, gamma)/SNR and therefore needs --snr_gamma" in capsys.readouterr().err


def test_defaults_are_the_same_end_to_end(vae):
    """The trainer's flags, LPLObjective and LPLConfig share one set of defaults (the seed
    document's recommendations); the drop-in keeps the reference's for its arguments."""
    assert tr.lpl_config(tr.parse_args([])) == LPLConfig() == LPLObjective(vae).config
    assert LPLConfig() == LPLConfig(loss_type="mse", norm_type="shared", pow_law=True, num_blocks=4,
                                    remove_outliers=True, grad_ckpt=True, reference_compat=False,
                                    t_threshold=200, snr_gamma=None, scale=False, start_step=0,
                                    decoder_fp32=True, sync_free=False, capacity=None)
    reference = LatentPerceptualLoss(vae, reference_compat=False).config
    assert (reference.loss_type, reference.grad_ckpt, reference.pow_law, reference.norm_type, reference.num_blocks,
            reference.feature_type, reference.remove_outliers, reference.decoder_fp32) == (
        "mse", True, False, "default", 4, "feature", True, False)


def test_values_are_normalized_once():
    config = LPLConfig(norm_type="Shared", pow_law=0, snr_gamma=5)
    assert (config.norm_type, config.pow_law, config.snr_gamma) == ("shared", False, 5.0)
    assert isinstance(config.snr_gamma, float)


def test_replace_validates_and_names_unknown_options():
    config = LPLConfig()
    assert config.replace(num_blocks=2).num_blocks == 2 and config.num_blocks == 4  # frozen
    with pytest.raises(ValueError, match="^num_blocks must be between 0 and 4"):
        config.replace(num_blocks=9)
    with pytest.raises(ValueError, match="^n_blocks must be between 0 and 4"):
        config.replace({"num_blocks": "n_blocks"}, num_blocks=9)
    with pytest.raises(TypeError, match=r"unknown LPL option\(s\) \['num_mid_blocks'\]"):
        config.replace(num_mid_blocks=2)
    with pytest.raises(TypeError, match=r"unknown LPL option\(s\) \['layers'\]"):
        LPLObjective(tiny_vae("sdxl_like", seed=4), layers=3)


def test_objective_takes_a_config_and_keyword_overrides(vae):
    config = LPLConfig(norm_type="batch", num_blocks=1, t_threshold=300)
    obj = LPLObjective(vae, config, sync_free=True)
    assert obj.config == config.replace(sync_free=True)
    assert obj.loss.config is obj.config  # one object from the objective down to the loss
    assert (obj.t_threshold, obj.sync_free, obj.capacity, obj.num_layers) == (300, True, None, 2)
    assert obj.loss.n_blocks == 1 and obj.loss.norm_type == "batch"
    obj.capacity = 1  # the objective's own options assign through the config (validated)
    assert obj.config.capacity == 1
    with pytest.raises(ValueError, match="^capacity must be a positive"):
        obj.capacity = 0
    with pytest.raises(TypeError, match="config: expected an lpl_ext.LPLConfig"):
        LPLObjective(vae, {"norm_type": "batch"})
    with pytest.raises(ValueError, match="feature_type: LPLObjective needs 'feature'"):
        LPLObjective(vae, feature_type="image")


def test_reference_names_map_onto_the_config(vae):
    """The drop-in's constructor arguments and the reference's attributes are one table."""
    assert set(REFERENCE_NAMES) == set(fields_of("loss"))
    lpl = LatentPerceptualLoss(vae, "l1", False, True, "batch", 2, "feature", False, reference_compat=False,
                               compute_stats=False)
    assert lpl.config == LPLConfig(loss_type="l1", grad_ckpt=False, pow_law=True, norm_type="batch", num_blocks=2,
                                   remove_outliers=False, reference_compat=False, decoder_fp32=False,
                                   compute_stats=False)
    for field, (_, attribute) in REFERENCE_NAMES.items():
        if attribute is not None:
            assert getattr(lpl, attribute) == getattr(lpl.config, field), attribute
    assert (lpl.n_blocks, lpl.outlier_mask, lpl.gradient_checkpointing) == (2, False, False)
    lpl.n_blocks = 1  # the reference's attribute assigns through the config
    assert lpl.config.num_blocks == 1 and lpl.num_layers == 2
    lpl.loss_type = "mse"
    assert isinstance(lpl.loss_fn, torch.nn.MSELoss) and list(dict(lpl.named_children())) == ["loss_fn"]
    with pytest.raises(ValueError, match="^n_blocks must be between 0 and 4"):
        lpl.n_blocks = 7
    assert lpl.n_blocks == 1
    config = LPLConfig(norm_type="none", num_blocks=3)
    built = LatentPerceptualLoss.from_config(vae, config)
    assert built.config is config and built.num_layers == 4 and built.reference_compat is False


def test_trainer_flags_are_generated_from_the_config():
    """Every LPLConfig option with a flag has it, with the field's default, choices and help;
    the flag's value reaches the config under the field's name."""
    actions = {a.dest: a for a in tr.build_parser()._actions}
    defaults = LPLConfig()
    flags = flag_names()
    assert set(flags) == {name for name, f in FIELDS.items() if f.metadata["flag"] is not None}
    for field, flag in flags.items():
        action = actions[flag]
        assert action.default == getattr(defaults, field), flag
        if FIELDS[field].metadata["choices"]:
            assert tuple(action.choices) == FIELDS[field].metadata["choices"]
        if flag not in tr.LPL_SHARED_FLAGS:
            assert action.help.replace("%%", "%") == LPLConfig.help(field, {f: f"--{n}" for f, n in flags.items()})
    args = tr.parse_args(["--lpl_num_blocks", "2", "--lpl_start", "3", "--lpl_sync_free", "--lpl_capacity", "1",
                          "--no_lpl_pow_law", "--lpl_reference_compat"])
    assert tr.lpl_config(args) == LPLConfig(num_blocks=2, start_step=3, sync_free=True, capacity=1, pow_law=False,
                                            reference_compat=True)


# ---------------------------------------------------------------- one log-key schema


def test_log_keys_schema():
    keys = LPLObjective.log_keys(1)
    assert keys == ["lpl_loss", "lpl_applied_ratio", "lpl_num_samples", "lpl_layer0_loss", "lpl_layer0_mean",
                    "lpl_layer0_std", "lpl_layer0_outlier_ratio", "lpl_layer1_loss", "lpl_layer1_mean",
                    "lpl_layer1_std", "lpl_layer1_outlier_ratio"]
    assert len(LPLObjective.log_keys(4)) == 3 + 5 * 4
    assert tr.metric_names(3) == ["loss", "diffusion_loss", *LPLObjective.log_keys(3)]


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("timesteps", [[10, 500, 20], [600, 700, 800]], ids=["applied", "none_below"])
def test_objective_logs_exactly_the_schema(vae, sync_free, timesteps):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    pred, zt, z0, t, kw = make_batch(scheduler, "epsilon", timesteps, perfect=False)
    for obj, step in ((LPLObjective(vae, num_blocks=2, sync_free=sync_free), 0),
                      (LPLObjective(vae, start_step=5, sync_free=sync_free), 0)):  # before start_step
        _, logs = obj(pred, zt, z0, t, global_step=step, **kw)
        assert list(logs) == LPLObjective.log_keys(obj.num_layers - 1)
        # the trainer's StepMetrics takes every key, weighted as the schema says
        metrics = tr.StepMetrics(tr.metric_names(obj.config.num_blocks))
        weights = tr.metric_weights(logs)
        assert set(weights) == set(logs) - set(LPLObjective.BATCH_KEYS)
        metrics.add(logs, weights)


def test_a_key_added_to_the_schema_must_be_logged(vae, monkeypatch):
    """A summary key the objective does not fill is an error at the first call, not a key
    missing from metrics.csv."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    pred, zt, z0, t, kw = make_batch(scheduler, "epsilon", [10, 20], perfect=False)
    monkeypatch.setattr(LPLObjective, "SUMMARY_KEYS", LPLObjective.SUMMARY_KEYS + ("lpl_new_value",))
    with pytest.raises(KeyError, match="lpl_new_value"):
        LPLObjective(vae)(pred, zt, z0, t, **kw)
