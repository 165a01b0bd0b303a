"""Reliability pieces: loss guard, ABFT matmul check, replica fingerprints, fault injection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longcat_jax.training import reliability as R
from sharding import make_mesh

# ----------------------------------------------------------------------------------------------- guard

check = jax.jit(R.guard_check, static_argnames=("spike_factor", "warmup", "ema"))


def warmed(n=5, loss=2.0):
    """A guard after n good steps at `loss`, with the spike test switched on (warmup=n)."""
    state = R.init_guard()
    for _ in range(n):
        ok, state = check(state, loss, 1.0, warmup=n)
        assert ok
    return state


@pytest.mark.parametrize("loss, gnorm, why", [
    (jnp.nan, 1.0, "nan loss"), (jnp.inf, 1.0, "inf loss"), (2.0, jnp.inf, "inf grad norm"),
    (2.0, jnp.nan, "nan grad norm"), (6.5, 1.0, "spike above 3x"),
])
def test_guard_fires_and_leaves_ema_alone(loss, gnorm, why):
    state = warmed()
    ok, new = check(state, loss, gnorm, warmup=5)
    assert not ok, why
    assert new.loss_ema == state.loss_ema and new.good_steps == state.good_steps
    assert new.consecutive_bad == 1 and new.total_skipped == 1


def test_guard_ignores_normal_noise_and_warmup_spikes():
    # A noisy, falling loss curve (including the fast initial drop) never trips the guard.
    rng = np.random.default_rng(0)
    losses = 11.0 * np.exp(-np.arange(300) / 40.0) + 2.0 + 0.3 * rng.standard_normal(300)

    def body(state, loss):
        ok, state = R.guard_check(state, loss, 1.0, warmup=10)
        return state, ok

    state, oks = jax.jit(lambda xs: jax.lax.scan(body, R.init_guard(), xs))(jnp.asarray(losses))
    assert bool(oks.all()) and state.total_skipped == 0 and state.good_steps == 300
    # Before `warmup` good steps a large loss is not a spike (there is no reference yet).
    ok, _ = check(warmed(3), 100.0, 1.0, warmup=5)
    assert ok


def test_guard_consecutive_counter_and_restore():
    state = warmed()
    for i in range(3):
        ok, state = check(state, jnp.nan, 1.0, warmup=5)
        assert not ok and state.consecutive_bad == i + 1
    assert R.needs_restore(state, 3) and not R.needs_restore(state, 4)
    ema = state.loss_ema
    ok, state = check(state, 2.2, 1.0, warmup=5)
    assert ok and state.consecutive_bad == 0 and state.total_skipped == 3
    assert state.loss_ema == pytest.approx(0.99 * float(ema) + 0.01 * 2.2)
    assert not R.needs_restore(state, 1)
    with pytest.raises(ValueError, match="max_consecutive"):
        R.needs_restore(state, 0)


def test_select_tree_keeps_old_on_bad_step():
    old = {"w": jnp.ones((2, 3)), "count": jnp.array(4, jnp.int32), "h": jnp.zeros(2, jnp.bfloat16)}
    new = {"w": jnp.full((2, 3), jnp.nan), "count": jnp.array(5, jnp.int32), "h": jnp.ones(2, jnp.bfloat16)}
    sel = jax.jit(R.select_tree)
    kept, taken = sel(jnp.array(False), new, old), sel(jnp.array(True), new, old)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()) and a.dtype == b.dtype, kept, old))
    assert int(taken["count"]) == 5 and bool(jnp.isnan(taken["w"]).all()) and taken["h"].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------- ABFT

abft = jax.jit(R.abft_matmul, static_argnames=("rtol", "precision"))
verify = jax.jit(R.abft_check, static_argnames=("rtol",))
SHAPES = [((8, 64), (64, 32)), ((2, 3, 128), (128, 96)), ((4, 512), (512, 256))]


def operands(xs, ws, dtype, positive, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
    if positive:  # no cancellation: the hardest case for a magnitude-scaled tolerance
        x, w = jnp.abs(x), jnp.abs(w) + 0.1
    return x.astype(dtype), w.astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("xs, ws", SHAPES)
def test_abft_no_false_positives(xs, ws, dtype, positive):
    for seed in range(3):
        x, w = operands(xs, ws, dtype, positive, seed)
        y, bad = abft(x, w)
        assert not bad
        assert y.shape == xs[:-1] + ws[-1:] and y.dtype == dtype
        ref = jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
        np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_abft_detects_flips_in_y(dtype):
    x, w = operands((8, 64), (64, 32), dtype, False)
    y, bad = abft(x, w)
    assert not bad
    csum = R.weight_checksum(w)
    mant = jnp.finfo(dtype).nmant - 1  # top mantissa bit: changes the value by >= 1/4 of itself
    big = int(jnp.argmax(jnp.abs(y)))
    small = int(jnp.argmin(jnp.abs(jnp.abs(y.astype(jnp.float32)) - 0.5)))  # |v| < 2: exponent flip blows up
    for index, bit in [(small, R.high_bit(dtype)), (big, mant), (big, R.high_bit(dtype) + 1)]:
        assert verify(x, R.flip_bit(y, index, bit), csum), (index, bit)
    assert not verify(x, y, csum)


def test_abft_detects_flips_in_w_after_checksum():
    x, w = operands((8, 64), (64, 32), jnp.float32, False)
    csum = R.weight_checksum(w)  # taken while w is good
    k_big = int(jnp.argmax(jnp.abs(w)))
    for index, bit in [(5, R.high_bit(jnp.float32)), (k_big, 22), (k_big, 31)]:
        w_bad = R.flip_bit(w, index, bit)
        assert abft(x, w_bad, checksum=csum)[1], (index, bit)
        if bit != R.high_bit(jnp.float32):  # (that one overflows y to Inf, a mismatch either way)
            # Without the earlier checksum y is consistent with the corrupted w: nothing to see.
            assert not abft(x, w_bad)[1]


def test_abft_tolerance_and_input_errors(monkeypatch):
    assert R.default_rtol(jnp.float32, jnp.float32) == R.RTOL_EXACT_PRODUCTS  # CPU computes f32 exactly
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # tf32 may round f32 inputs there
    assert R.default_rtol(jnp.float32, jnp.float32) == R.RTOL_REDUCED_PRECISION
    assert R.default_rtol(jnp.float32, jnp.float32, "highest") == R.RTOL_EXACT_PRODUCTS
    assert R.default_rtol(jnp.bfloat16, jnp.bfloat16) == R.RTOL_EXACT_PRODUCTS
    with pytest.raises(ValueError, match="x \\[..., K\\] and w \\[K, M\\]"):
        R.abft_matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))
    x, w = operands((4, 16), (16, 8), jnp.float32, False)
    assert abft(x.at[1, 2].set(jnp.nan), w)[1]


def test_flip_bit():
    x = jnp.array([1.0, -2.5, 0.375], jnp.float32)
    assert float(R.flip_bit(x, 1, 31)[1]) == 2.5
    assert float(R.flip_bit(x.astype(jnp.bfloat16), 2, 15)[2]) == -0.375
    assert float(R.flip_bit(x, 0, 30)[0]) == 2.0**128 or jnp.isinf(R.flip_bit(x, 0, 30)[0])
    twice = jax.jit(lambda a, i: R.flip_bit(R.flip_bit(a, i, 7), i, 7))(x, 2)
    np.testing.assert_array_equal(twice, x)
    changed = np.flatnonzero(np.asarray(R.flip_bit(x, 2, 0)) != np.asarray(x))
    assert changed.tolist() == [2]
    with pytest.raises(ValueError, match="bit 32 out of range"):
        R.flip_bit(x, 0, 32)
    with pytest.raises(ValueError, match="flat_index 3 out of range"):
        R.flip_bit(x, 3, 0)


# ---------------------------------------------------------------------------------------- fingerprint

fp = jax.jit(R.fingerprint)


def sample_tree():
    k = jax.random.key(0)
    return {"emb": jax.random.normal(k, (16, 8)), "norm": jnp.ones(8, jnp.bfloat16),
            "step": jnp.array(7, jnp.int32), "mask": jnp.array([True, False]),
            "half": jnp.arange(6, dtype=jnp.float16), "rng": jax.random.key(3)}


def test_fingerprint_equal_for_equal_trees():
    a = sample_tree()
    b = jax.tree.map(lambda v: jnp.array(v, copy=True) if not jnp.issubdtype(v.dtype, jax.dtypes.prng_key)
                     else jax.random.key(3), sample_tree())
    assert fp(a).dtype == jnp.uint32 and fp(a).shape == ()
    assert fp(a) == fp(b) == R.fingerprint(a)
    # Pinned value: fingerprints stay comparable across versions and runs.
    assert int(R.fingerprint({"a": jnp.arange(4, dtype=jnp.float32)})) == 0x225C9C01


def numpy_fingerprint(leaves):
    """The documented recipe in plain Python integers (no wrap-around tricks to get wrong)."""
    m32 = 2**32 - 1

    def mix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & m32
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & m32
        return h ^ (h >> 16)

    h = 0
    for i, leaf in enumerate(leaves):
        a = np.asarray(leaf).reshape(-1)
        words = a.view(np.dtype(f"uint{a.dtype.itemsize * 8}")).astype(np.uint64).tolist()
        leaf_h = sum(mix((w + p * 0x9E3779B9) & m32) for p, w in enumerate(words)) & m32
        h = mix(((h ^ leaf_h) + 0x9E3779B9 * (i + 1)) & m32)
    return h


def test_fingerprint_matches_numpy_recipe():
    tree = {"a": jax.random.normal(jax.random.key(1), (5, 7)),
            "b": jnp.linspace(-3, 3, 9).astype(jnp.bfloat16), "c": jnp.arange(-4, 4, dtype=jnp.int32)}
    assert int(fp(tree)) == numpy_fingerprint([tree["a"], tree["b"], tree["c"]])


@pytest.mark.parametrize("leaf, bits", [("emb", [0, 9, 22, 23, 30, 31]), ("norm", range(16)),
                                        ("half", [0, 10, 15]), ("step", [0, 31])])
def test_fingerprint_sees_one_bit(leaf, bits):
    tree = sample_tree()
    base = fp(tree)
    for bit in bits:
        flipped = dict(tree, **{leaf: R.flip_bit(tree[leaf], 3 % tree[leaf].size, bit)})
        assert fp(flipped) != base, (leaf, bit)


def test_fingerprint_sees_moves():
    tree = sample_tree()
    emb = tree["emb"]
    swapped = dict(tree, emb=emb.at[0, 0].set(emb[0, 1]).at[0, 1].set(emb[0, 0]))  # same multiset
    assert fp(swapped) != fp(tree)
    a, b = jnp.zeros(4), jnp.ones(4)
    assert fp({"a": a, "b": b}) != fp({"a": b, "b": a})


# ------------------------------------------------------------------------------------ replicas (8 CPUs)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"dp": 4, "tp": 2})


def placed(mesh):
    def put(x, *spec):
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))

    return {"w": put(jnp.arange(48.0).reshape(6, 8) / 7), "proj": put(jnp.ones((4, 8)), None, "tp"),
            "norm": put(jnp.full((8,), 0.5, jnp.bfloat16))}


def test_replica_fingerprints_agree_and_find_the_odd_one(mesh):
    tree = placed(mesh)
    fps = R.replica_fingerprints(tree, mesh)
    assert fps.shape == (4,) and fps.dtype == jnp.uint32
    assert not R.fingerprint_mismatch(fps) and R.odd_replicas(fps) == []
    for leaf, bit in [("w", 30), ("norm", 0)]:
        dev = mesh.devices[2, 0, 0, 0, 1, 0]  # dp=2, tp=1: not the device jax reads "the" value from
        bad = dict(tree, **{leaf: R.flip_bit_on_device(tree[leaf], dev, 5, bit)})
        assert bad[leaf].sharding == tree[leaf].sharding  # jax still believes it is replicated
        assert R.fingerprint(bad) == R.fingerprint(tree)  # a global view cannot see the divergence
        fps_bad = R.replica_fingerprints(bad, mesh)
        assert bool(jax.jit(R.fingerprint_mismatch)(fps_bad)), leaf
        assert R.odd_replicas(fps_bad) == [2]
        assert (np.asarray(fps_bad)[[0, 1, 3]] == np.asarray(fps)[[0, 1, 3]]).all()


def test_replica_fingerprint_input_errors(mesh):
    tree = placed(mesh)
    with pytest.raises(ValueError, match="sharded over 'dp'"):
        R.replica_fingerprints(dict(tree, z=jax.device_put(jnp.ones(8), NamedSharding(mesh, P("dp")))), mesh)
    with pytest.raises(TypeError, match="NamedSharding"):
        R.replica_fingerprints(dict(tree, z=np.ones(3)), mesh)
    with pytest.raises(ValueError, match="not a mesh axis"):
        R.replica_fingerprints(tree, mesh, axis="data")
    with pytest.raises(ValueError, match="fully replicated"):
        R.flip_bit_on_device(tree["proj"], mesh.devices.flat[0])


def test_odd_replicas():
    assert R.odd_replicas(np.array([1, 1, 9, 1], np.uint32)) == [2]
    assert R.odd_replicas(np.array([1, 9], np.uint32)) == [0, 1]  # two replicas: cannot tell which
    assert R.odd_replicas(np.array([5, 5], np.uint32)) == []


# ----------------------------------------------------------------------------------- fault injection


@pytest.mark.parametrize("spec, want", [("nan-grad@3", ("nan-grad", 3)), ("bitflip@0", ("bitflip", 0)),
                                        (" bitflip@120 ", ("bitflip", 120))])
def test_parse_fault(spec, want):
    assert R.parse_fault(spec) == R.Fault(*want)


@pytest.mark.parametrize("spec", ["nan@3", "bitflip@x", "nan-grad@-1", "", "nan-grad", "bitflip@3@4",
                                  "NAN-GRAD@3", "bitflip@1.5", None])
def test_parse_fault_rejects(spec):
    with pytest.raises(ValueError, match="bad fault spec"):
        R.parse_fault(spec)


def test_inject_nan_trips_the_guard():
    grads = {"a_step": jnp.array(3, jnp.int32), "b": jnp.ones((2, 2)), "c": jnp.ones(3)}
    inject = jax.jit(R.inject_nan)
    hit = inject(grads, jnp.array(True))
    assert bool(jnp.isnan(hit["b"][0, 0])) and int(jnp.isnan(hit["b"]).sum()) == 1
    assert (hit["c"] == 1).all() and hit["a_step"] == 3  # integer leaves are skipped
    miss = inject(grads, jnp.array(False))
    assert fp(miss) == fp(grads)
    gnorm = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree.leaves(hit)))
    ok, _ = check(R.init_guard(), 2.0, gnorm)
    assert not ok
    with pytest.raises(ValueError, match="floating-point leaf"):
        R.inject_nan({"i": jnp.ones(2, jnp.int32)})


def test_inject_bitflip():
    params = {"a": jnp.full((3, 4), 0.02), "b": jnp.ones(2, jnp.bfloat16)}
    hit = jax.jit(R.inject_bitflip)(params, jnp.array(True))
    diff = np.flatnonzero(np.asarray(hit["a"]) != np.asarray(params["a"]))
    assert diff.tolist() == [0] and float(hit["a"][0, 0]) > 1e30  # one element, blown up
    assert (hit["b"] == params["b"]).all()
    assert fp(hit) != fp(params)
    assert fp(R.inject_bitflip(params, False)) == fp(params)
    low = R.inject_bitflip(params, flat_index=5, bit=0)
    assert np.flatnonzero(np.asarray(low["a"]) != np.asarray(params["a"])).tolist() == [5]
