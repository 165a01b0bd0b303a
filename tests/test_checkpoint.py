"""HF layouts in and out, Orbax round trips, streaming shards and clear errors on bad checkpoints."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import longcat_jax as lj
from longcat_jax import convert
from longcat_jax.checkpoint import SafetensorsFolder
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
    # SPEC 5 key inventory: N-gram tables per branch, indexer on the owner sublayer only, one shared MTP block.
    assert {"model.oe_embed_tokens0.weight", "model.oe_embed_proj3.weight", "model.mtp.layers.0.eh_proj.weight",
            "model.layers.1.self_attn.0.indexer.weights_proj.weight", "model.mtp.layers.0.self_attn.indexer.wk.weight",
            "model.layers.0.mlp.experts.5.down_proj.weight", "model.mtp.norm.weight"} <= names
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


def test_hf_orbax_hf_round_trip_is_lossless(tmp_path):
    ref = random_flash(seed=3)
    ref.save_pretrained(tmp_path / "hf")
    assert convert.main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "orbax")]) == 0
    assert convert.main(["--orbax", str(tmp_path / "orbax"), "--out", str(tmp_path / "back"), "--to-hf"]) == 0
    before, after = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    # transformers also saves gate/up tensors for the zero experts, which no forward pass reads (SPEC 4.1).
    unused = {n for n in before if ".mlp.experts." in n and int(n.split(".")[5]) >= ref.config.n_routed_experts}
    assert unused and set(before) == set(after)
    for name in after:
        if name in unused:  # written back as zeros: transformers needs them present, nothing reads them
            assert not after[name].any()
        else:
            np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    with pytest.raises(FileExistsError):
        convert.main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "orbax")])


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


def test_saved_flash_folder_loads_in_transformers(tmp_path):
    """Our Flash-layout export is a folder transformers itself can load, with the same logits."""
    import torch
    from transformers import LongcatFlashForCausalLM

    ref = random_flash(seed=5)
    ref.save_pretrained(tmp_path / "hf")
    cfg, model = lj.load_hf(str(tmp_path / "hf"), mla_norm_eps=1e-6)
    lj.save_hf(model, str(tmp_path / "out"))
    again = LongcatFlashForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.tensor(ids)).logits.numpy(), ref(torch.tensor(ids)).logits.numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_safetensors_dtype_kept(tmp_path):
    model = lj.build_model(lj.Config.tiny(param_dtype="bfloat16", dtype="bfloat16"), seed=0)
    lj.save_hf(model, str(tmp_path))
    folder = SafetensorsFolder(str(tmp_path))
    name = "model.layers.0.mlp.router.classifier.weight"
    with safe_open(os.path.join(tmp_path, folder.where[name]), "numpy") as f:
        assert f.get_tensor(name).dtype == np.float32  # router stays f32 (SPEC 3.5)
        other = "model.layers.0.mlps.0.gate_proj.weight"
        if other in f.keys():
            assert str(f.get_tensor(other).dtype) == "bfloat16"
    cfg, loaded = lj.load_hf(str(tmp_path))
    assert cfg.param_dtype == "bfloat16"
    assert loaded.layers.moe.classifier[...].dtype == jnp.float32
