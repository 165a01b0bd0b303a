"""The model on the kernel path (cfg.kernel_impl = "xla" | "pallas") equals the reference path.

Forward logits (LSA with SI, CLI and HI, N-gram lookup, MTP), the training loss with its sparse-stage indexer
KL and every gradient on packed documents with padding, and prefill + decode over a cache. Pallas runs
interpreted on CPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import longcat_jax as lj
from longcat_jax.training.train_step import LossSettings, compute_loss
from tests.helpers import rel_err

CFG = lj.Config.tiny()  # every feature on; HI engages above 24 keys, top-k 16
PAD = 2  # padding tokens at the end of each row of the packed batch
FORWARD = jax.jit(lj.forward, static_argnames=("with_mtp", "collect_aux", "dense_attention", "remat"))
LOSS_AND_GRADS = jax.jit(jax.value_and_grad(compute_loss, has_aux=True), static_argnums=(1, 3, 4),
                         static_argnames=("measure_recall", "dense_attention"))


def _model(impl):
    return lj.build_model(dataclasses.replace(CFG, kernel_impl=impl), seed=0)


@pytest.fixture(scope="module")
def reference():
    return _model("reference")


@pytest.fixture(scope="module")
def reference_results(reference):
    """The reference side of every comparison, computed once for both kernel impls."""
    return {"forward": FORWARD(reference, _tokens(1, 40)), "training": _loss_and_grads(reference),
            "warmup": _loss_and_grads(reference, dense=True), "decode": _generate(reference)}


def _tokens(seed, T):
    return jnp.asarray(np.random.RandomState(seed).randint(0, CFG.vocab_size, (2, T)))


def _packed_batch(T=40, pad_ids=None):
    """Row 0: one document; row 1: two documents (positions restart in each). Both rows end in PAD padding
    tokens as the eval data pipeline pads (id 0, segment 0, position 0, loss_mask 0); pad_ids [2, PAD]
    replaces their ids. Every padding token sits at position 0: in HI's block 0 and in each other's SI
    window."""
    rng = np.random.RandomState(0)
    ids = rng.randint(3, CFG.vocab_size, (2, T + 1)).astype(np.int32)
    seg = np.ones((2, T), np.int32)
    seg[1, 13:] = 2  # row 1 packs two documents
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T)).copy()
    pos[1, 13:] = np.arange(T - 13)
    inputs, targets = ids[:, :-1], ids[:, 1:].copy()  # the last real token's target stays real (an EOS)
    seg[:, T - PAD:], pos[:, T - PAD:] = 0, 0
    inputs[:, T - PAD:] = targets[:, T - PAD:] = 0 if pad_ids is None else pad_ids
    return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets),
            "positions": jnp.asarray(pos), "segment_ids": jnp.asarray(seg),
            "loss_mask": jnp.asarray(seg > 0, jnp.float32)}


def _loss_and_grads(model, dense=False, batch=None):
    """Loss terms and gradients on the packed batch:
    the sparse stage (recall measured) or the dense warm-up."""
    graphdef, params = nnx.split(model)
    batch = _packed_batch() if batch is None else batch
    (_, (terms, _, _)), grads = LOSS_AND_GRADS(params, graphdef, batch, model.cfg, LossSettings(),
                                               measure_recall=not dense, dense_attention=dense)
    return terms, grads


def _generate(model):
    """Prefill 30 tokens into a 40-row cache, then decode 6 more one at a time; all logits."""
    tokens = _tokens(2, 36)
    logits, cache = jax.jit(lj.prefill, static_argnums=2)(model, tokens[:, :30], 40)
    outs = [logits]
    step = jax.jit(lj.decode_step)
    for t in range(30, 36):
        logits, cache = step(model, tokens[:, t:t + 1], cache)
        outs.append(logits)
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_forward_equals_reference(reference_results, impl):
    want = reference_results["forward"]
    got = FORWARD(_model(impl), _tokens(1, 40))
    assert rel_err(got.logits, want.logits) < 1e-5
    assert rel_err(got.mtp_logits, want.mtp_logits) < 1e-5


@pytest.mark.parametrize("stage", ["sparse", "warmup"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_training_loss_and_gradients_equal_reference(reference_results, impl, stage):
    """On packed documents with padding, every loss term and every gradient match. Sparse stage: the indexer
    KL over the selected keys and the measured selection recall. Dense warm-up: blockwise dense attention, the
    KL over every allowed key and the recall (longcat_jax.model.dense_warmup)."""
    want_terms, want_grads = reference_results["training" if stage == "sparse" else "warmup"]
    got_terms, got_grads = _loss_and_grads(_model(impl), dense=stage == "warmup")
    assert got_terms.keys() == want_terms.keys() and 0.5 < float(got_terms["indexer_recall"]) < 1.0
    for k, v in got_terms.items():
        np.testing.assert_allclose(float(v), float(want_terms[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(got_terms["indexer_kl"]) > 0
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        assert rel_err(g, w) < 1e-4, jax.tree_util.keystr(path)


def test_padding_ids_change_no_loss_or_gradient(reference, reference_results):
    """Padding is no document: other ids in the padding leave every loss term and gradient as they were
    (HI's block means pool no padding key; MTP reads no token past a document's end)."""
    want_terms, want_grads = reference_results["training"]
    pad_ids = np.random.RandomState(5).randint(3, CFG.vocab_size, (2, PAD))
    got_terms, got_grads = _loss_and_grads(reference, batch=_packed_batch(pad_ids=pad_ids))
    for k, v in got_terms.items():
        np.testing.assert_allclose(float(v), float(want_terms[k]), rtol=1e-6, err_msg=k)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        assert rel_err(g, w) < 1e-6, jax.tree_util.keystr(path)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_prefill_and_decode_equal_reference(reference_results, impl):
    assert rel_err(_generate(_model(impl)), reference_results["decode"]) < 1e-5
