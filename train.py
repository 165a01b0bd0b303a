"""Train a LongCat model end to end on CPU: the model issue's main job.

    python train.py                       # Config.tiny() on Python standard-library source, bytes as tokens
    python train.py --steps 300 --lr 3e-3

Reads top to bottom: settings, data, model, jitted step, loop. Bytes are the tokens (vocab 256, EOS = byte 2 is
never produced by UTF-8 text other than control characters, so documents are joined with it). The full trainer
(BPE tokenizer, grain pipeline, Muon, MTP and indexer losses, checkpoints) is the training issue.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import longcat_jax as lj


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a LongCat model end to end.")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mtp-weight", type=float, default=0.3)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0:
        parser.error("--lr must be > 0")
    return args


def stdlib_bytes(eos: int, max_bytes: int = 4_000_000) -> np.ndarray:
    """Python standard-library sources, sorted by path, joined with EOS: a real corpus on every machine."""
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".py"))
    chunks, total = [], 0
    for path in paths:
        data = open(path, "rb").read() + bytes([eos])
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks), np.uint8).astype(np.int32)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = lj.Config.tiny()
    corpus = stdlib_bytes(cfg.eos_token_id)
    split = int(len(corpus) * 0.95)
    train, held_out = corpus[:split], corpus[split:]
    rng = np.random.default_rng(args.seed)

    def batch(data):
        starts = rng.integers(0, len(data) - args.seq_len - 1, args.batch_size)
        return jnp.asarray(np.stack([data[s : s + args.seq_len + 1] for s in starts]))

    model = lj.build_model(cfg, seed=args.seed)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(
        args.lr, args.steps, alpha=0.1), weight_decay=0.01))
    graphdef, params = nnx.split(model)
    opt_state = optimizer.init(params)

    def loss_fn(params, tokens):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        out = lj.forward(nnx.merge(graphdef, params), inputs)
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, targets).mean()
        mtp = 0.0
        if out.mtp_logits is not None:  # step k at position t predicts token t+k+1
            for k in range(cfg.mtp_num_steps):
                valid = inputs.shape[1] - k - 1
                mtp += optax.softmax_cross_entropy_with_integer_labels(
                    out.mtp_logits[k, :, :valid], targets[:, k + 1 :]).mean() / cfg.mtp_num_steps
        return ce + args.mtp_weight * mtp, ce

    @jax.jit
    def train_step(params, opt_state, tokens):
        (_, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce

    eval_loss = jax.jit(lambda p, t: loss_fn(p, t)[1])
    eval_batches = [batch(held_out) for _ in range(4)]
    before = float(np.mean([eval_loss(params, b) for b in eval_batches]))
    print(f"tiny LongCat: {cfg.num_layers} layers, every feature on; held-out loss before: {before:.3f}")
    start = time.time()
    for step in range(1, args.steps + 1):
        params, opt_state, ce = train_step(params, opt_state, batch(train))
        if step % 20 == 0 or step == args.steps:
            tok_s = step * args.batch_size * args.seq_len / (time.time() - start)
            print(f"step {step:5d}  loss {float(ce):.3f}  {tok_s:8.0f} tok/s")
    after = float(np.mean([eval_loss(params, b) for b in eval_batches]))
    print(f"held-out loss: {before:.3f} -> {after:.3f}")
    return 0 if after < before else 1


if __name__ == "__main__":
    sys.exit(main())
