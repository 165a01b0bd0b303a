"""Sharding rules: the resolver's guarantees and a golden table of every parameter's PartitionSpec."""

import json
import os

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from longcat_jax import Config, abstract_model
from sharding import constrain, logical_to_spec, make_mesh, parse_mesh

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "sharding_tiny.json")


def resolved_specs(cfg: Config) -> dict[str, list]:
    """'path.to.param' -> resolved mesh axes per dimension, under the default RULES."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract_model(cfg))):
        names = tuple(var.get_metadata()["out_sharding"])
        assert len(names) == len(var.get_value().shape), (path, names)
        out[".".join(map(str, path))] = [a if a is None or isinstance(a, str) else list(a)
                                         for a in logical_to_spec(names)]
    return dict(sorted(out.items()))


def test_golden_partition_specs():
    """Any change to a parameter's logical names or to RULES shows up here; regenerate deliberately with
    `python -m tests.test_sharding`."""
    with open(GOLDEN) as f:
        assert resolved_specs(Config.tiny()) == json.load(f)


def test_stacked_params_carry_layers_axis():
    specs = resolved_specs(Config.tiny())
    assert all(v[0] == "pp" for k, v in specs.items() if k.startswith("layers."))


def test_resolver_rejects_unknown_and_duplicate_axes():
    with pytest.raises(ValueError, match="unknown logical axis"):
        logical_to_spec(("embed", "nonsense"))
    with pytest.raises(ValueError, match="used twice"):
        logical_to_spec(("heads", "mlp"))  # both map to tp
    assert logical_to_spec(("experts", None, "expert_mlp")) == P("ep", None, "tp")


def test_parse_mesh_errors():
    assert parse_mesh("dp=2,tp=4") == {"dp": 2, "tp": 4}
    with pytest.raises(ValueError, match="unknown mesh axis"):
        parse_mesh("xx=2")
    with pytest.raises(ValueError, match="positive integer"):
        parse_mesh("dp=0")
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh({"dp": 16})


def test_constrain_applies_under_a_mesh():
    mesh = make_mesh({"dp": 2, "tp": 4})
    x = jax.numpy.ones((4, 8, 16))
    with jax.set_mesh(mesh):
        y = jax.jit(lambda x: constrain(x * 2, ("batch", None, "mlp")))(x)
    assert y.sharding.spec == P("dp", None, "tp")
    assert constrain(x, ("batch", None, "mlp")) is x  # no mesh: nothing to constrain to


if __name__ == "__main__":
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in resolved_specs(Config.tiny()).items()]
    with open(GOLDEN, "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {GOLDEN}")
