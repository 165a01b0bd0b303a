"""Helpers shared by the tests: a relative-norm error, and what a traced program materialises (the memory
tests of the kernels check that no [T, S] array appears)."""

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
