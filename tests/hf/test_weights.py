"""HF layouts in and out, Orbax round trips, streaming shards and clear errors on bad checkpoints."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

import longcat_jax as lj
from longcat_jax import convert
from longcat_jax.hf import expert_layout
from longcat_jax.hf.weights import SafetensorsFolder, hf_expert_layout
from tests.hf_reference import random_flash


def _tensors(path):
    folder = SafetensorsFolder(str(path))
    return {name: folder.get(name) for name in folder.where}


def _tokens(cfg, batch=2, length=20):
    return jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, length)))


@pytest.fixture(scope="module")
def tiny_model():
    return lj.build_model(lj.Config.tiny(), seed=0)


def test_longcat2_layout_round_trip(tiny_model, tmp_path):
    lj.save_hf(tiny_model, str(tmp_path))
    hf = json.load(open(tmp_path / "config.json"))
    assert hf["architectures"] == ["LongcatCausalLM"] and hf["oe_neighbor_num"] == 3 and hf["use_longcat_dsa"]
    names = set(_tensors(tmp_path))
    # The LongCat-2.0 key inventory: N-gram tables per branch, indexer on the owner sublayer only, one shared
    # MTP block.
    assert {"model.oe_embed_tokens0.weight", "model.oe_embed_proj3.weight",
            "model.mtp.layers.0.eh_proj.weight", "model.layers.1.self_attn.0.indexer.weights_proj.weight",
            "model.mtp.layers.0.self_attn.indexer.wk.weight", "model.layers.0.mlp.experts.5.down_proj.weight",
            "model.mtp.norm.weight"} <= names
    assert not any("self_attn.1.indexer" in n for n in names)
    assert not any("mtp.layers.1" in n for n in names)
    cfg, loaded = lj.load_hf(str(tmp_path))
    assert cfg == tiny_model.cfg
    tokens = _tokens(cfg)
    a, b = lj.forward(tiny_model, tokens), lj.forward(loaded, tokens)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.mtp_logits, b.mtp_logits)


def test_lite_layout_names(tmp_path):
    model = lj.build_model(lj.Config.tiny(use_indexer=False, si_enabled=False, hi_enabled=False), seed=2)
    lj.save_hf(model, str(tmp_path))
    names = set(_tensors(tmp_path))
    assert "model.ngram_embeddings.embedders.3.weight" in names
    assert "model.ngram_embeddings.post_projs.0.weight" in names
    cfg, loaded = lj.load_hf(str(tmp_path))
    np.testing.assert_array_equal(loaded(_tokens(cfg)), model(_tokens(cfg)))


def test_many_shards_and_mesh_load(tiny_model, tmp_path):
    lj.save_hf(tiny_model, str(tmp_path), max_shard_bytes=64 * 1024)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(files) > 3 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    assert not any(f.endswith(".partial") for f in os.listdir(tmp_path))
    from sharding.mesh import make_mesh

    mesh = make_mesh({"ep": 2, "tp": 2, "vp": 2})
    cfg, loaded = lj.load_hf(str(tmp_path), mesh=mesh)
    assert loaded.ngram.tables[...].sharding.spec[0] == "vp"
    assert loaded.layers.moe.w_down[...].sharding.spec[1] == "ep"
    with jax.set_mesh(mesh):
        got = jax.jit(lambda m, t: m(t))(loaded, _tokens(cfg))
    np.testing.assert_allclose(got, tiny_model(_tokens(cfg)), rtol=1e-5, atol=1e-6)
    # 6 experts on ep=4: an error naming the tensor, not experts silently replicated on every device.
    message = r"moe.w_\w+: dimension 1 \(logical 'experts', size 6\) is not divisible by mesh axis 'ep'"
    with pytest.raises(ValueError, match=message):
        lj.load_hf(str(tmp_path), mesh=make_mesh({"ep": 4, "dp": 2}))


def test_hf_orbax_hf_round_trip_is_lossless(tmp_path, capsys):
    ref = random_flash(seed=3)
    ref.save_pretrained(tmp_path / "hf")
    assert convert.main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "orbax")]) == 0
    assert "experts stored per_expert (one tensor per routed expert" in capsys.readouterr().out
    assert convert.main(["--orbax", str(tmp_path / "orbax"), "--out", str(tmp_path / "back"), "--to-hf"]) == 0
    before, after = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert set(before) == set(after)
    for name in after:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    with pytest.raises(FileExistsError):
        convert.main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "orbax")])
    fused = str(tmp_path / "fused")
    assert convert.main(["--orbax", str(tmp_path / "orbax"), "--out", fused, "--to-hf",
                         "--expert-layout", "fused"]) == 0
    assert hf_expert_layout(fused) == "fused"


@pytest.fixture(scope="module")
def flash_pair(tmp_path_factory):
    """A random transformers LongcatFlash and our model loaded from its save_pretrained folder."""
    path = tmp_path_factory.mktemp("flash_pair")
    ref = random_flash(seed=5)
    ref.save_pretrained(path)
    assert hf_expert_layout(str(path)) == "per_expert"  # what the installed transformers writes
    cfg, model = lj.load_hf(str(path), mla_norm_eps=1e-6)
    return ref, cfg, model


def _state(model):
    return jax.tree.leaves(nnx.state(model))


@pytest.mark.parametrize("layout", sorted(expert_layout.LAYOUTS))
def test_every_expert_layout_round_trips(flash_pair, tmp_path, layout):
    """save_hf writes each layout, load_hf detects it and reads back the same parameters; the zero experts'
    gate/up tensors are present (as zeros) exactly in the *_with_zero layouts."""
    _, cfg, model = flash_pair
    lj.save_hf(model, str(tmp_path), experts=layout)
    assert hf_expert_layout(str(tmp_path)) == layout
    names = set(_tensors(tmp_path))
    fused = "model.layers.1.mlp.experts.gate_up_proj" in names
    zero = f"model.layers.1.mlp.experts.{cfg.n_routed_experts}.gate_proj.weight" in names
    assert fused == layout.startswith("fused") and zero == (layout == "per_expert_with_zero")
    if layout == "fused_with_zero":
        assert _tensors(tmp_path)["model.layers.1.mlp.experts.gate_up_proj"].shape[0] == cfg.num_slots
    _, loaded = lj.load_hf(str(tmp_path), mla_norm_eps=1e-6)
    for a, b in zip(_state(model), _state(loaded), strict=True):
        np.testing.assert_array_equal(a, b)


def test_fused_folder_of_transformers_loads(flash_pair, tmp_path):
    """The fused layout as transformers writes it (save_original_format=False) reads the same weights."""
    ref, _, model = flash_pair
    ref.save_pretrained(tmp_path, save_original_format=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in _tensors(tmp_path)
    assert hf_expert_layout(str(tmp_path)) == "fused"
    _, loaded = lj.load_hf(str(tmp_path), mla_norm_eps=1e-6)
    for a, b in zip(_state(model), _state(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    # On a mesh each device reads only the experts of its ep shard from the fused tensors.
    from sharding.mesh import make_mesh

    _, sharded = lj.load_hf(str(tmp_path), mesh=make_mesh({"ep": 2, "tp": 2, "vp": 2}), mla_norm_eps=1e-6)
    assert sharded.layers.moe.w_gate[...].sharding.spec[1] == "ep"
    for a, b in zip(_state(model), _state(sharded), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_expert_layout_is_named(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="expert layout 'packed': expected one of per_expert"):
        lj.save_hf(tiny_model, str(tmp_path), experts="packed")


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = _tensors(dst)
    edit(tensors)
    for f in os.listdir(dst):
        if f.endswith(".safetensors") or f.endswith(".json") and f != "config.json":
            os.remove(os.path.join(dst, f))
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)


@pytest.fixture(scope="module")
def flash_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("flash")
    random_flash(seed=4).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind,edit,message", [
    ("missing", lambda t: t.pop("model.layers.1.self_attn.0.kv_b_proj.weight"),
     r"1 missing tensor\(s\): model.layers.1.self_attn.0.kv_b_proj.weight"),
    ("unexpected", lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}),
     r"1 unexpected tensor\(s\): model.layers.0.extra.weight"),
    ("misshaped", lambda t: t.update({"model.norm.weight": np.zeros(5, np.float32)}),
     r"mis-shaped tensor\(s\): model.norm.weight: \(5,\) != expected \(64,\)"),
])
def test_bad_tensors_are_named(flash_folder, tmp_path, kind, edit, message):
    path = _broken_copy(flash_folder, tmp_path / kind, edit)
    with pytest.raises(ValueError, match=message):
        lj.load_hf(path)


def test_missing_shard_file_and_bad_architecture(tiny_model, tmp_path):
    lj.save_hf(tiny_model, str(tmp_path / "a"), max_shard_bytes=64 * 1024)
    os.remove(tmp_path / "a" / sorted(f for f in os.listdir(tmp_path / "a") if f.endswith(".safetensors"))[1])
    with pytest.raises(FileNotFoundError, match="is missing"):
        lj.load_hf(str(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    hf = json.load(open(tmp_path / "b" / "config.json"))
    hf["architectures"] = ["LlamaForCausalLM"]
    json.dump(hf, open(tmp_path / "b" / "config.json", "w"))
    with pytest.raises(ValueError, match="expected one of"):
        lj.load_hf(str(tmp_path / "b"))
    with pytest.raises(FileNotFoundError):
        convert.load_orbax(str(tmp_path / "nothing"))


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_saved_flash_folder_loads_in_transformers(flash_pair, tmp_path, layout):
    """Our Flash-layout export is a folder the installed transformers loads, with the same logits. (The
    *_with_zero layouts are for transformers 5.24, which needs the zero experts' tensors; later releases
    refuse them.)"""
    import torch
    from transformers import LongcatFlashForCausalLM

    ref, cfg, model = flash_pair
    lj.save_hf(model, str(tmp_path), experts=layout)
    again = LongcatFlashForCausalLM.from_pretrained(tmp_path).eval()
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        got, want = again(torch.tensor(ids)).logits, ref(torch.tensor(ids)).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_safetensors_dtype_kept(tmp_path):
    model = lj.build_model(lj.Config.tiny(param_dtype="bfloat16", dtype="bfloat16"), seed=0)
    lj.save_hf(model, str(tmp_path))
    folder = SafetensorsFolder(str(tmp_path))
    name = "model.layers.0.mlp.router.classifier.weight"
    with safe_open(os.path.join(tmp_path, folder.where[name]), "numpy") as f:
        assert f.get_tensor(name).dtype == np.float32  # router stays f32 (docs/architecture.md#router)
        other = "model.layers.0.mlps.0.gate_proj.weight"
        if other in f.keys():
            assert str(f.get_tensor(other).dtype) == "bfloat16"
    cfg, loaded = lj.load_hf(str(tmp_path))
    assert cfg.param_dtype == "bfloat16"
    assert loaded.layers.moe.classifier[...].dtype == jnp.float32
