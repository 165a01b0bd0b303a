"""Run checkpoints: bit-exact state + data position round trips, keep-K, corruption fallback, stop signals."""

import json
import os
import signal
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longcat_jax.training.run_checkpoint import (
    MANIFEST,
    CheckpointIntegrityError,
    RunCheckpointer,
    install_stop_signals,
    verify_step_dir,
)
from sharding.mesh import make_mesh


def _iter():
    return iter(grain.MapDataset.range(1000).shuffle(seed=0).batch(4).to_iter_dataset())


def _state(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"params": {"w": jax.random.normal(k1, (8, 16)), "b": jax.random.normal(k2, (16,), jnp.bfloat16)},
            "opt": {"mu": jnp.full((8, 16), seed * 0.5), "count": jnp.int32(seed)},
            "step": jnp.uint32(seed)}


def _abstract(state):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _assert_bit_identical(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        bits = [np.asarray(v).reshape(-1).view(np.uint8) for v in (x, y)]
        np.testing.assert_array_equal(*bits)


def _run(tmp_path, steps, *, keep=5, save_every=1, logs=None):
    """Save `_state(s)` at each step s, the iterator advanced s batches; returns the uninterrupted one."""
    it = _iter()
    with RunCheckpointer(tmp_path, keep=keep, save_every=save_every, log=(logs or []).append) as ck:
        done = 0
        for s in steps:
            for _ in range(s - done):
                next(it)
            done = s
            ck.maybe_save(s, _state(s), it)
    return it


def _first_file(step_dir, part):
    return next(p for p in sorted(Path(step_dir).rglob("*")) if p.is_file() and part in str(p))


def test_round_trip_bit_identical_and_iterator_position(tmp_path):
    it = _run(tmp_path, [3])
    expected_next = next(it)  # what the uninterrupted run reads next
    logs = []
    fresh = _iter()
    step, state = RunCheckpointer(tmp_path, log=logs.append).restore_latest(_abstract(_state()), fresh)
    assert step == 3
    _assert_bit_identical(state, _state(3))
    np.testing.assert_array_equal(next(fresh), expected_next)
    assert not np.array_equal(next(_iter()), expected_next)  # the restore really moved the iterator
    assert any("restored step 3" in m for m in logs)


def test_async_save_survives_deleted_buffers_then_wait(tmp_path):
    ck = RunCheckpointer(tmp_path, save_every=10, log=lambda m: None)
    state = _state(7)
    expected = jax.tree.map(np.asarray, state)
    assert not ck.maybe_save(5, state, _iter())  # not due
    assert ck.maybe_save(jnp.int32(10), state, _iter())  # a device step counter names directory "10"
    # A training loop donates the buffers right after the save call: the async save must hold a host copy.
    for leaf in jax.tree.leaves(state):
        leaf.delete()
    ck.wait()
    assert ck.all_steps() == [10] and ck.verify(10) is None
    assert (tmp_path / "10" / MANIFEST).is_file()
    assert not ck.maybe_save(10, _state(7), _iter(), force=True)  # already saved: no second save of one step
    assert ck.maybe_save(13, _state(7), _iter(), force=True)  # forced off-schedule (e.g. SIGTERM)
    ck.close()
    _assert_bit_identical(ck.restore(10, _abstract(_state())), expected)
    assert ck.all_steps() == [10, 13]


def test_keep_last_k(tmp_path):
    _run(tmp_path, [2, 4, 6, 8, 10], keep=2, save_every=2)
    assert RunCheckpointer(tmp_path).all_steps() == [8, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "8"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_latest_falls_back_and_reports(tmp_path, damage):
    _run(tmp_path, [1, 2])
    victim = _first_file(tmp_path / "2", "state/d/")
    if damage == "truncate":
        os.truncate(victim, victim.stat().st_size // 2)
    elif damage == "flip":  # same size, one byte changed: only the crc can see it
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    logs = []
    ck = RunCheckpointer(tmp_path, log=logs.append)
    step, state = ck.restore_latest(_abstract(_state()))
    assert step == 1
    _assert_bit_identical(state, _state(1))
    bad = [m for m in logs if "step 2" in m]
    assert len(bad) == 1 and victim.name in bad[0], logs
    assert {"truncate": "bytes", "flip": "crc32", "delete": "missing"}[damage] in bad[0]
    # The bad step is moved aside, so the resumed run can save step 2 again.
    assert ck.all_steps() == [1] and (tmp_path / "2.corrupt").is_dir()
    assert ck.maybe_save(2, _state(2), _iter(), force=True)
    ck.close()
    assert ck.verify(2) is None


def test_interrupted_saves_are_ignored_and_reported(tmp_path):
    _run(tmp_path, [1, 2, 3])
    (tmp_path / "3" / "commit_success.txt").unlink()  # orbax's commit marker gone
    (tmp_path / "2" / MANIFEST).unlink()  # killed after orbax finalized, before our manifest
    tmp = tmp_path / "4.orbax-checkpoint-tmp-1234"  # killed before orbax finalized
    (tmp / "state").mkdir(parents=True)
    logs = []
    fresh = _iter()
    step, state = RunCheckpointer(tmp_path, log=logs.append).restore_latest(_abstract(_state()), fresh)
    assert step == 1
    _assert_bit_identical(state, _state(1))
    np.testing.assert_array_equal(next(fresh), next(_run(tmp_path / "ref", [1])))
    joined = "\n".join(logs)
    assert "step 4" in joined and "never finalized" in joined and not tmp.exists()
    assert any("step 3" in m and "commit_success.txt" in m for m in logs)
    assert any("step 2" in m and MANIFEST in m for m in logs)


def test_no_checkpoints_and_none_good(tmp_path):
    assert RunCheckpointer(tmp_path / "empty").restore_latest(_abstract(_state())) is None
    _run(tmp_path / "run", [1])
    (tmp_path / "run" / "1" / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointIntegrityError, match="no usable checkpoint.*step 1.*unreadable"):
        RunCheckpointer(tmp_path / "run", log=lambda m: None).restore_latest(_abstract(_state()))


def test_explicit_restore_refuses_corrupt_step_and_bad_args(tmp_path):
    _run(tmp_path, [1])
    ck = RunCheckpointer(tmp_path)
    with pytest.raises(FileNotFoundError, match="step 9"):
        ck.restore(9, _abstract(_state()))
    with pytest.raises(RuntimeError, match="abstract_state"):
        ck.restore(1, {"other": jax.ShapeDtypeStruct((3,), jnp.float32)})
    manifest = json.loads((tmp_path / "1" / MANIFEST).read_text())["files"]
    assert "commit_success.txt" in manifest and all(crc is not None for _, crc in manifest.values())
    os.truncate(_first_file(tmp_path / "1", "_CHECKPOINT_METADATA"), 3)
    assert "_CHECKPOINT_METADATA" in verify_step_dir(tmp_path / "1")
    with pytest.raises(CheckpointIntegrityError, match="step 1"):
        ck.restore(1, _abstract(_state()))
    with pytest.raises(ValueError, match="non-negative"):
        ck.maybe_save(-1, _state(), force=True)
    with pytest.raises(ValueError, match="keep"):
        RunCheckpointer(tmp_path, keep=0)


def test_stop_signals_set_flag_and_restore_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    flag = install_stop_signals()
    try:
        assert not flag.requested and flag.signal_name is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # repeated SIGTERM: still just the flag
        assert flag.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C while already stopping means "now"
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.uninstall()
    assert {s: signal.getsignal(s) for s in before} == before


def test_restore_with_shardings_on_mesh(tmp_path):
    mesh = make_mesh({"dp": 2, "tp": 4})
    state = _state(4)
    _run(tmp_path, [4])
    want = {"params": {"w": NamedSharding(mesh, P("dp", "tp")), "b": NamedSharding(mesh, P("tp"))},
            "opt": {"mu": NamedSharding(mesh, P(None, "tp")), "count": NamedSharding(mesh, P())},
            "step": NamedSharding(mesh, P())}
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, want)
    step, restored = RunCheckpointer(tmp_path).restore_latest(abstract)
    assert step == 4
    shardings = jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, NamedSharding))
    for leaf, s in zip(jax.tree.leaves(restored), shardings, strict=True):
        assert leaf.sharding == s and len(leaf.addressable_shards) == 8
    assert restored["params"]["w"].addressable_shards[0].data.shape == (4, 4)
    _assert_bit_identical(restored, state)
