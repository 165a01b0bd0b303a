"""serve.py: greedy generation through the decode cache, and its command line."""

import jax.numpy as jnp
import numpy as np
import pytest

import longcat_jax as lj
import serve


def test_greedy_generation_is_consistent_with_forward():
    cfg = lj.Config.tiny()
    model = lj.build_model(cfg, seed=0)
    prompt = jnp.asarray([[5, 17, 42, 9]], jnp.int32)
    new = lj.generate(model, prompt, 6)
    full = jnp.concatenate([prompt, new], axis=1)
    greedy = np.asarray(jnp.argmax(lj.forward(model, full).logits, -1))
    np.testing.assert_array_equal(greedy[0, 3:-1], np.asarray(new[0]))


def test_serve_cli(capsys):
    assert serve.main(["--preset", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.strip().split(",")) == 3
    with pytest.raises(SystemExit):
        serve.main(["--preset", "tiny", "--prompt-ids", "1,999"])
    assert "outside the vocabulary" in capsys.readouterr().err


def test_serve_cli_kernel_path_matches_reference(capsys):
    """A prompt longer than the top-k, so LSA selects: the kernel path generates the same tokens."""
    prompt = ",".join(str(i) for i in np.random.RandomState(0).randint(3, 256, 24))
    outs = []
    for impl in ("reference", "xla"):
        assert serve.main(["--preset", "tiny", "--prompt-ids", prompt, "--max-new-tokens", "4",
                           "--kernel-impl", impl]) == 0
        outs.append(capsys.readouterr().out.strip())
    assert outs[0] == outs[1]
