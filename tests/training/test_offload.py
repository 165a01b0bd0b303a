"""Optimizer-state offload: the state waits in pinned host memory and the update equals the on-device one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import longcat_jax as lj
from longcat_jax.training.optim import OptimizerSettings, make_optimizer
from longcat_jax.training.reliability import init_guard
from longcat_jax.training.train_step import LossSettings, TrainState, train_step


def _batch(cfg, B=2, T=24, seed=0):
    ids = np.random.RandomState(seed).randint(3, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    return {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
            "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
            "segment_ids": jnp.ones((B, T), jnp.int32), "loss_mask": jnp.ones((B, T), jnp.float32)}


def test_offloaded_optimizer_state_gives_the_same_update():
    # The offload logic does not depend on the model;
    # a one-layer model without extras keeps the compiles short.
    cfg = lj.Config.tiny(num_layers=1, ngram_n=0, use_indexer=False, si_enabled=False, hi_enabled=False,
                         mtp_num_steps=0)
    graphdef, params = nnx.split(lj.build_model(cfg, seed=0))
    optimizer = make_optimizer(OptimizerSettings(lr=1e-2, warmup_steps=1, total_steps=10), params)
    opt_state = jax.jit(optimizer.init)(params)
    host = jax.tree.map(lambda x: x.sharding.with_memory_kind("pinned_host"), opt_state)
    step = functools.partial(train_step, graphdef=graphdef, cfg=cfg, optimizer=optimizer,
                             settings=LossSettings())
    plain = jax.jit(step)
    offloaded = jax.jit(functools.partial(step, host_opt_shardings=host))

    def start(opt):
        return TrainState(params=params, opt_state=opt, step=jnp.zeros((), jnp.int32), guard=init_guard())

    a, b = start(opt_state), start(jax.device_put(opt_state, host))
    for i in range(2):
        a, ma, _ = plain(a, _batch(cfg, seed=i))
        b, mb, _ = offloaded(b, _batch(cfg, seed=i))
        assert float(ma["loss"]) == float(mb["loss"])
    assert {x.sharding.memory_kind for x in jax.tree.leaves(b.opt_state)} == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(a.opt_state)} == {"device"}
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
