"""Pipeline parallelism over the stacked layers (longcat_jax/model/pipeline.py): a training step's loss terms,
expert loads and gradients on pp=2 meshes (alone, with dp, with tp) equal one device's; the compiled step
passes activations between stages instead of gathering the layers; the schedule's helpers and flag checks."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import longcat_jax as lj
import train
from longcat_jax.model import pipeline
from longcat_jax.training.loop import REMAT_POLICIES
from longcat_jax.training.run_settings import describe_pipeline
from longcat_jax.training.train_step import LossSettings, accumulated_grads
from sharding.mesh import make_mesh
from tests.helpers import packed_batch, rel_err

# Four layers: two per stage on pp=2, so each stage also scans over its own layers. The indexer (whose KL and
# recall are per-layer means) stays on; MTP and the N-gram embedding run outside the layers and are off.
CFG = lj.Config.tiny(num_layers=4, mtp_num_steps=0, ngram_n=0, hi_enabled=False)
# The balance loss's weight is 0: it is the one statistic a microbatch split changes (pipeline.py); its value
# is still reported and checked below.
SETTINGS = LossSettings(balance_weight=0.0)
ROWS, T = 4, 16


def _batch():
    """Four rows: one with two packed documents, one ending in padding, so token counts differ per row."""
    return packed_batch(CFG.vocab_size, ROWS, T, second_doc={2: 9}, padding={1: 11})


def _grads(params, graphdef, microbatches, remat=None):
    return accumulated_grads(params, _batch(), 1, graphdef=graphdef, cfg=CFG, settings=SETTINGS,
                             microbatches=microbatches, remat=remat)


@pytest.fixture(scope="module")
def one_device():
    graphdef, params = nnx.split(lj.build_model(CFG, seed=0))
    return jax.jit(functools.partial(_grads, graphdef=graphdef, microbatches=1))(params)


# (mesh, microbatches, remat): two microbatches overlap the stages, with each device's rows split between
# them; with one, the balance loss is exact too. Each is a compile of its own: two keep the file short.
MESHES = {
    "pp2-dp2-m2": ({"pp": 2, "dp": 2}, 2, "none"),
    "pp2-tp2-m1-remat": ({"pp": 2, "tp": 2}, 1, "full"),
}


@pytest.fixture(scope="module", params=list(MESHES))
def pipelined(request):
    """(sizes, microbatches, the step's results, its compiled HLO text, the stacked layers' full shapes)."""
    sizes, microbatches, remat = MESHES[request.param]
    mesh = make_mesh(sizes, devices=jax.devices()[:int(np.prod(list(sizes.values())))])
    graphdef, params = nnx.split(lj.build_model(CFG, seed=0, mesh=mesh))
    # build_model places the stacked `layers` axis over pp: each stage stores its own layers only
    assert params["layers"]["moe"]["w_gate"].get_value().sharding.spec[0] == "pp"
    fn = functools.partial(_grads, graphdef=graphdef, microbatches=microbatches, remat=REMAT_POLICIES[remat])
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(params).compile()
        out = compiled(params)
    stacked = {_hlo_shape(x) for x in jax.tree.leaves(nnx.split(lj.abstract_model(CFG).layers)[1])}
    return sizes, microbatches, out, compiled.as_text(), stacked


def _hlo_shape(x) -> str:
    kind = {"float32": "f32", "int32": "s32"}[str(x.dtype)]
    return f"{kind}[{','.join(map(str, x.shape))}]"


def test_pipelined_step_equals_one_device(one_device, pipelined):
    """Loss terms (rtol 1e-4), expert loads (exact) and every gradient (relative norm error < 1e-4) as on one
    device; the balance loss too with one microbatch (rtol 1e-4), and within 10% with two."""
    sizes, microbatches, (g2, (t2, load2, _)), _, _ = pipelined
    g1, (t1, load1, _) = one_device
    np.testing.assert_array_equal(load1, load2)
    for k in ("loss", "ce", "z_loss", "indexer_kl"):
        np.testing.assert_allclose(t2[k], t1[k], rtol=1e-4, err_msg=k)
    balance_rtol = 1e-4 if microbatches == 1 else 0.1
    np.testing.assert_allclose(t2["balance"], t1["balance"], rtol=balance_rtol)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2), strict=True):
        assert rel_err(b, a) < 1e-4, (sizes, jax.tree_util.keystr(path))


def test_compiled_step_passes_activations_not_layers(pipelined):
    """The stages hand activations on (collective-permute) and no device gathers a whole stacked [L, ...]
    layer parameter (the layer scan over the pp-sharded stack, without the schedule, gathers every one of
    them, forward and backward)."""
    sizes, _, _, hlo, stacked = pipelined
    assert "collective-permute" in hlo, sizes
    gathered = re.findall(r"= (\w+\[[\d,]*\])\S* all-gather(?:-start)?\(", hlo)
    assert not stacked & set(gathered), (sizes, stacked & set(gathered))


def test_split_keeps_rows_on_their_batch_shard():
    """Microbatch m holds rows m, m + M, ...: with the batch's rows in contiguous blocks per device, each
    microbatch takes its rows from every block, so no row moves; merge undoes split."""
    x = jnp.arange(8 * 3).reshape(8, 3)
    parts = pipeline.split(x, 2)
    np.testing.assert_array_equal(parts[:, :, 0], [[0, 6, 12, 18], [3, 9, 15, 21]])
    np.testing.assert_array_equal(pipeline.merge(parts), x)


def test_combined_statistics_equal_the_whole_batch():
    """Per-token means weighted by each microbatch's counted tokens are the whole batch's mean; loads add."""
    values = np.random.RandomState(1).rand(2, 3, 5).astype(np.float32)  # [M, L/S, tokens]
    counted = np.array([5, 2], np.float32)
    mask = np.arange(5)[None, :] < counted[:, None]  # microbatch 1 counts 2 of its 5 tokens
    means = (values * mask[:, None]).sum(-1) / counted[:, None]
    loads = np.arange(12).reshape(2, 3, 2)
    got = pipeline.combine_aux({"indexer_kl": jnp.asarray(means), "expert_load": jnp.asarray(loads)},
                               jnp.asarray(counted))
    whole = (values * mask[:, None]).sum((0, 2)) / counted.sum()
    np.testing.assert_allclose(got["indexer_kl"], whole, rtol=1e-6)
    np.testing.assert_array_equal(got["expert_load"], loads.sum(0))


def test_bubble_fraction_and_its_line():
    assert pipeline.bubble_fraction(2, 1) == 0.5 and pipeline.bubble_fraction(4, 13) == 0.1875
    assert pipeline.bubble_fraction(1, 8) == 0.0
    assert "2 stages, 4 microbatches: bubble 20% of stage time" in describe_pipeline(2, 4)


def test_microbatches_must_split_each_batch_shard():
    """4 rows on dp=2 are 2 per device: 2 microbatches split them, 4 do not, and the forward says so."""
    pipeline.check_microbatches(4, 2, 2)
    with pytest.raises(ValueError, match=r"4 microbatches must divide the rows of each of the 2 shards"):
        pipeline.check_microbatches(4, 4, 2)
    mesh = make_mesh({"pp": 2, "dp": 2}, devices=jax.devices()[:4])
    model = lj.abstract_model(CFG)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="4 microbatches must divide"):
        jax.eval_shape(functools.partial(lj.forward, microbatches=4), model, jnp.zeros((4, T), jnp.int32))


def test_microbatches_need_a_stage_axis():
    with pytest.raises(ValueError, match="2 microbatches: they split the batch for the pipeline"):
        jax.eval_shape(functools.partial(lj.forward, microbatches=2), lj.abstract_model(CFG),
                       jnp.zeros((4, T), jnp.int32))


@pytest.mark.parametrize("flags,message", [
    (["--microbatches", "2"], "splits the batch over pipeline stages: give a --mesh with pp > 1"),
    (["--microbatches", "0"], "--microbatches must be >= 1"),
    (["--mesh", "pp=2,dp=4", "--batch-size", "8", "--microbatches", "4"],
     "rows per micro-batch (8: --batch-size / --grad-accum) must divide by dp=4 x --microbatches 4"),
])
def test_microbatches_flag_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert message in capsys.readouterr().err


def test_microbatches_flag_parses():
    args = train.parse_args(["--mesh", "pp=2,dp=4", "--batch-size", "16", "--microbatches", "2"])
    assert args.microbatches == 2
