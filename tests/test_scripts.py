"""train.py and serve.py run end to end and reject bad flags."""

import jax.numpy as jnp
import numpy as np
import pytest

import longcat_jax as lj
import serve
import train


def test_greedy_generation_is_consistent_with_forward():
    cfg = lj.Config.tiny()
    model = lj.build_model(cfg, seed=0)
    prompt = jnp.asarray([[5, 17, 42, 9]], jnp.int32)
    new = serve.generate(model, prompt, 6)
    full = jnp.concatenate([prompt, new], axis=1)
    greedy = np.asarray(jnp.argmax(lj.forward(model, full).logits, -1))
    np.testing.assert_array_equal(greedy[0, 3:-1], np.asarray(new[0]))


def test_serve_cli(capsys):
    assert serve.main(["--preset", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.strip().split(",")) == 3
    with pytest.raises(SystemExit):
        serve.main(["--preset", "tiny", "--prompt-ids", "1,999"])
    assert "outside the vocabulary" in capsys.readouterr().err


def test_train_short_run_lowers_held_out_loss(capsys):
    assert train.main(["--steps", "12", "--batch-size", "4", "--seq-len", "32", "--lr", "5e-3"]) == 0
    assert "held-out loss" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--lr", "-1"], ["--bogus"]])
def test_train_rejects_bad_flags(flags):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
