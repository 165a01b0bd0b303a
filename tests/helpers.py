"""Helpers shared by the tests: a relative-norm error, what a traced program materialises (the memory tests of
the kernels check that no [T, S] array appears), and a packed training batch."""

import numpy as np


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def largest_intermediate(jaxpr) -> int:
    """Element count of the largest value any equation (nested jaxprs included) produces."""
    best = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            best = max(best, int(np.prod(getattr(v.aval, "shape", ()))))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    best = max(best, largest_intermediate(inner))
    return best


def packed_batch(vocab_size: int, rows: int, T: int, second_doc: dict[int, int],
                 padding: dict[int, int]) -> dict:
    """A training batch of random ids (seed 0), one document per row, except that row r of `second_doc`
    {r: start} packs a second document from `start` (its positions restart at 0) and row r of `padding`
    {r: start} is padding from `start` (segment 0, loss mask 0). Targets are the inputs shifted by one."""
    rng = np.random.RandomState(0)
    inputs = rng.randint(3, vocab_size, (rows, T)).astype(np.int32)
    seg = np.ones((rows, T), np.int32)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T)).copy()
    for r, start in second_doc.items():
        seg[r, start:] = 2
        pos[r, start:] = np.arange(T - start)
    for r, start in padding.items():
        seg[r, start:] = 0
    return {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1), "segment_ids": seg, "positions": pos,
            "loss_mask": (seg > 0).astype(np.float32)}
