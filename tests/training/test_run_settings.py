"""A run's settings without training: --config files (JSON, YAML, a saved run_config.json), typed
`model.FIELD=VALUE` overrides, the saved model config and the resume check on them."""

import json
import types

import pytest

import train
from longcat_jax.training import run_settings
from longcat_jax.training.init_weights import model_config

CORPUS = types.SimpleNamespace(tokenizer=types.SimpleNamespace(get_vocab_size=lambda: 300), eos=2)


def test_overrides_are_typed_and_reach_the_model():
    args = train.parse_args(["model.num_layers=3", "--steps", "7", "model.rope_factor=1",
                             "model.use_indexer=false", "model.expected_real_experts=none", "--dtype",
                             "bfloat16"])
    assert args.model == {"num_layers": 3, "rope_factor": 1.0, "use_indexer": False,
                          "expected_real_experts": None}
    cfg = model_config(args, CORPUS)
    assert (cfg.num_layers, cfg.rope_factor, cfg.use_indexer, cfg.dtype) == (3, 1.0, False, "bfloat16")
    assert cfg.param_dtype == "float32"  # --dtype is the compute dtype only


@pytest.mark.parametrize("item,message", [
    ("model.num_layerz=3", "did you mean model.num_layers?"),
    ("model.num_layers=x", "expected an integer"),
    ("model.use_indexer=maybe", "expected true or false"),
    ("model.mtp_hidden_source=middle", "expected one of pre_norm, post_norm"),
    ("model.vocab_size=512", "set by the tokenizer"),
    ("num_layers=3", "expected a flag or a model override"),
    ("model.cli_factor=3", "cli_factor must be 1 or 2"),  # the model config's own check
])
def test_bad_overrides_are_one_line(item, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args([item])
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_a_saved_run_config_is_a_config_file(tmp_path, capsys):
    """run_config.json holds every setting and the resolved model; given to --config it reproduces the run's
    defining settings, the command line still wins, and the per-invocation ones are left out, said once."""
    first = train.parse_args(["--out", str(tmp_path / "a"), "--steps", "9", "--lr", "0.01", "--deterministic",
                              "--warmup-steps", "0.2", "--allow-change", "steps", "model.num_layers=3"])
    (tmp_path / "a").mkdir()
    run_settings.save(first, model_config(first, CORPUS))
    saved = json.loads((tmp_path / "a" / "run_config.json").read_text())
    assert saved["model"] == {"num_layers": 3} and saved["model_config"]["num_layers"] == 3
    assert saved["model_config"]["vocab_size"] == 384

    config = str(tmp_path / "a" / "run_config.json")
    again = train.parse_args(["--config", config, "--out", str(tmp_path / "b"), "--lr", "0.02"])
    assert "left out allow_change, out" in capsys.readouterr().err
    for key in run_settings.DEFINING:
        if key != "lr":
            assert getattr(again, key) == getattr(first, key), key
    assert again.lr == 0.02 and again.deterministic and again.out == str(tmp_path / "b")


def test_yaml_config_and_its_errors(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("preset: small\nsteps: 40\nschedule: wsd\nmodel:\n  num_layers: 2\n  rope_factor: 1.0\n")
    args = train.parse_args(["--config", str(path), "model.num_layers=1"])  # the command line wins
    assert (args.preset, args.steps, args.schedule, args.model) == ("small", 40, "wsd",
                                                                     {"num_layers": 1, "rope_factor": 1.0})
    for text, message in [("stepz: 3\n", "unknown setting 'stepz' (did you mean steps?)"),
                          ("steps: many\n", "invalid int value"),
                          ("schedule: linear\n", "invalid choice"),
                          ("deterministic: 3\n", "deterministic must be true or false"),
                          ("- 1\n", "expected a mapping"),
                          ("steps: [\n", "not valid YAML")]:
        path.write_text(text)
        with pytest.raises(SystemExit):
            train.parse_args(["--config", str(path)])
        assert message in capsys.readouterr().err.strip().splitlines()[-1], text


def test_resume_refuses_changed_model_overrides(tmp_path):
    args = train.parse_args(["--out", str(tmp_path), "model.num_layers=3"])
    run_settings.save(args, model_config(args, CORPUS))
    resumed = train.parse_args(["--out", str(tmp_path), "--resume", "model.num_layers=4"])
    message = run_settings.check_resume(resumed)
    assert "started with model overrides {'num_layers': 3}, not {'num_layers': 4}" in message
    assert "--allow-change model" in message
    config = str(tmp_path / "run_config.json")
    same = train.parse_args(["--config", config, "--out", str(tmp_path), "--resume"])
    assert run_settings.check_resume(same) is None


def test_an_auto_mesh_axis_takes_the_devices_left():
    assert train.parse_args(["--mesh", "dp=auto,tp=2"]).mesh_sizes == {"dp": 4, "tp": 2}  # 8 test devices
