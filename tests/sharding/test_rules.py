"""Sharding rules: the resolver's guarantees and a golden table of every parameter's PartitionSpec."""

import json
import os

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import longcat_jax as lj
from longcat_jax import Config, abstract_model
from sharding import RULES, constrain, logical_to_spec, make_mesh, override_rules, parse_mesh

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
    `python -m tests.sharding.test_rules`."""
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


def test_rule_overrides_change_only_the_names_given():
    rules = override_rules("experts=ep+cp, batch=dp+ep, vocab=none")
    assert dict(rules) == {**dict(RULES), "experts": ("ep", "cp"), "batch": ("dp", "ep"), "vocab": None}
    assert [name for name, _ in rules] == [name for name, _ in RULES]  # same table, same order
    spec = logical_to_spec(("layers", "experts", "embed", "expert_mlp"), rules)
    assert spec == P("pp", ("ep", "cp"), None, "tp")
    with pytest.raises(ValueError, match="unknown logical axis 'expert'"):
        override_rules("expert=ep")
    with pytest.raises(ValueError, match="unknown mesh axis 'fsdp' for 'embed'"):
        override_rules("embed=fsdp")
    with pytest.raises(ValueError, match="is not 'logical=axes'"):
        override_rules("experts")


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


def test_custom_rules_reach_parameters_activations_and_loaded_checkpoints(tmp_path, monkeypatch):
    """build_model(rules=...) places the parameters by that table, the forward constrains its activations by
    it, and load_hf(rules=...) places what it reads by it: no place falls back to the default table."""
    from longcat_jax.model import longcat

    experts_on_tp = {"experts": "tp", "mlp": None, "expert_mlp": None, "vocab": None, "heads": None}
    rules = tuple((name, experts_on_tp.get(name, axes)) for name, axes in RULES)
    cfg = Config.tiny()
    mesh = make_mesh({"dp": 2, "ep": 2, "tp": 2})

    def split(x):  # mesh axes of size > 1 that split each dimension of x
        spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
        axes = [() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in spec]
        return tuple(tuple(a for a in d if mesh.shape[a] > 1) for d in axes)

    model = lj.build_model(cfg, seed=0, mesh=mesh, rules=rules)
    custom, default = ((), ("tp",), (), ()), ((), ("ep",), (), ("tp",))  # [layers, experts, embed, mlp]
    assert split(model.layers.moe.w_gate[...]) == custom
    assert split(lj.build_model(cfg, seed=0, mesh=mesh).layers.moe.w_gate[...]) == default

    seen = []

    def spy(x, names, rules=RULES):
        seen.append(rules)
        return constrain(x, names, rules)

    monkeypatch.setattr(longcat, "constrain", spy)
    with jax.set_mesh(mesh):
        jax.jit(lambda m, t: m(t))(model, jax.numpy.zeros((2, 8), jax.numpy.int32))
    assert seen and all(r == rules for r in seen)

    lj.save_hf(model, str(tmp_path))
    _, loaded = lj.load_hf(str(tmp_path), mesh=mesh, rules=rules)
    assert split(loaded.layers.moe.w_gate[...]) == custom

if __name__ == "__main__":
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in resolved_specs(Config.tiny()).items()]
    with open(GOLDEN, "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {GOLDEN}")
