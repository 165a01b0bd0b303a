"""A mesh axis that does not divide the dimension it shards is an error naming both, never a silent
replication (docs/architecture.md#logical-axes)."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longcat_jax import Config, abstract_model
from sharding import abstract_mesh, check_divisible, make_mesh, override_rules, resolve_shardings
from sharding.divisibility import shard_shape

TINY = abstract_model(Config.tiny())  # 6 routed experts, 4 heads, 256-row vocabulary


@pytest.mark.parametrize("mesh", [abstract_mesh({"ep": 4}), make_mesh({"ep": 4, "dp": 2})],
                         ids=["abstract", "concrete"])
def test_indivisible_axis_names_array_dimension_logical_name_and_mesh_axis(mesh):
    with pytest.raises(ValueError) as err:
        check_divisible(TINY, mesh)
    msg = str(err.value)
    assert msg.startswith("layers.moe.w_down: dimension 1 (logical 'experts', size 6) is not divisible by "
                          "mesh axis 'ep' of size 4")
    assert msg.endswith("(and 2 more)") and "\n" not in msg  # w_gate and w_up too, in one line


def test_axes_that_divide_pass_and_give_shard_shapes():
    mesh = abstract_mesh({"dp": 2, "ep": 2, "tp": 2, "vp": 2})
    leaves = {leaf.path: leaf for leaf in resolve_shardings(TINY, mesh)}
    assert len(leaves) == len(jax.tree.leaves(TINY))
    gate = leaves["layers.moe.w_gate"]  # [layers, experts, embed, expert_mlp] = (2, 6, 64, 32)
    assert gate.names == ("layers", "experts", "embed", "expert_mlp")
    assert gate.spec == ("pp", "ep", None, "tp")
    assert shard_shape(gate, mesh) == (2, 3, 64, 16)
    # the same numbers as jax's own sharding arithmetic, for every parameter
    for leaf in leaves.values():
        expected = NamedSharding(mesh, P(*leaf.spec)).shard_shape(leaf.shape)
        assert shard_shape(leaf, mesh) == expected, leaf.path


def test_logical_shapes_and_multi_axis_rules():
    mesh = abstract_mesh({"dp": 4, "ep": 2, "tp": 4})
    with pytest.raises(ValueError, match=r"^batch: dimension 0 \(logical 'batch', size 6\) is not divisible "
                                         r"by mesh axis 'dp' of size 4$"):
        check_divisible({"batch": ((6, 128), ("batch", "seq"))}, mesh)
    check_divisible({"batch": ((8, 128), ("batch", "seq"))}, mesh)
    rules = override_rules("experts=ep+tp,expert_mlp=none")
    with pytest.raises(ValueError, match=r"\(logical 'experts', size 6\) is not divisible by mesh axes "
                                         r"'ep'x'tp' of size 2x4=8"):
        check_divisible(TINY, mesh, rules)


def test_resolver_guarantees_hold_through_the_check():
    mesh = abstract_mesh({"tp": 2})
    with pytest.raises(ValueError, match="unknown logical axis 'nonsense'"):
        check_divisible({"x": ((4, 4), ("embed", "nonsense"))}, mesh)
    with pytest.raises(ValueError, match="mesh axis 'tp' used twice"):
        check_divisible({"x": ((4, 4), ("heads", "mlp"))}, mesh)
    with pytest.raises(ValueError, match="x: 1 logical names"):
        check_divisible({"x": ((4, 4), ("embed",))}, mesh)


def test_resolved_specs_are_checked_too():
    """Arrays or ShapeDtypeStructs that already carry a NamedSharding (e.g. optimizer state) are checked by
    their spec; there is no logical name to report then."""
    mesh = make_mesh({"tp": 4, "dp": 2})
    good = jax.ShapeDtypeStruct((8, 6), np.float32, sharding=NamedSharding(mesh, P("tp")))
    bad = jax.ShapeDtypeStruct((6, 8), np.float32, sharding=NamedSharding(mesh, P("tp")))
    check_divisible({"w": good, "plain": np.zeros(3)}, mesh)
    with pytest.raises(ValueError, match=r"^\['w'\]: dimension 0 \(size 6\) is not divisible by mesh axis "
                                         r"'tp' of size 4$"):
        check_divisible({"w": bad}, mesh)
