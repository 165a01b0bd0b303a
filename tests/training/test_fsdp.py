"""--fsdp: parameters split over dp along the model width; the run trains like one device."""

import numpy as np
import orbax.checkpoint as ocp
import pytest

import train
from longcat_jax.training.run_log import read_metrics
from tests.training.conftest import FAST

# A one-layer model without indexer, MTP or N-gram keeps the two compiles short.
RUN = [*FAST, "--indexer-warmup-steps", "0", "--sample-tokens", "0", "--steps", "3", "model.num_layers=1",
       "model.use_indexer=false", "model.si_enabled=false", "model.hi_enabled=false", "model.mtp_num_steps=0",
       "model.ngram_n=0"]


def _losses(out):
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


def test_fsdp_on_dp4_tp2_trains_like_one_device(tmp_path, corpus):
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    assert train.main(["--out", str(one), "--data", corpus, *RUN]) == 0
    assert train.main(["--out", str(fsdp), "--data", corpus, *RUN, "--mesh", "dp=4,tp=2", "--fsdp"]) == 0
    np.testing.assert_allclose(_losses(fsdp), _losses(one), rtol=1e-5)
    # The checkpoint records each array's layout: a [layers, D, q_lora] weight has D split over dp (layers
    # over pp, of size 1 here).
    meta = ocp.StandardCheckpointer().metadata(str(fsdp / "checkpoints" / "3" / "state"))
    w = meta.item_metadata["params"]["layers"]["attn0"]["w_q_down"]["value"]
    assert tuple(w.sharding.partition_spec) == ("pp", "dp", None), w.sharding


def test_fsdp_needs_dp(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--fsdp", "--mesh", "tp=8"])
    assert "--fsdp shards parameters over dp" in capsys.readouterr().err
