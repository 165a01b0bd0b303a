"""`python -m longcat_jax.convert --run RUN --out HF_DIR`: a train.py run folder (built by test_serve's
`fake_run`) exported as a Hugging Face folder that load_hf, transformers' AutoTokenizer / GenerationConfig
and, for a Flash-layout run, AutoModelForCausalLM read back; and the one-line errors."""

import contextlib
import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

import longcat_jax as lj
from longcat_jax import convert
from longcat_jax.serving.load import load_run
from longcat_jax.serving.text import TextTokenizer
from tests.test_serve import fake_run, leaves

TEXTS = ["def f(x):\n    return x + 1\n", "héllo wörld — ünïcode ✓", "a</s>b<s>c<pad>",
         "   spaces\t\ttabs\n\n"]
# tiny without what transformers' LongcatFlash lacks (N-gram embedding, indexer and so SI / HI); one MTP block
# as LongCat-Flash has. transformers' MLA norms use eps 1e-6.
FLASH_TINY = dict(ngram_n=0, use_indexer=False, si_enabled=False, hi_enabled=False, mtp_num_steps=1,
                  mla_norm_eps=1e-6)


def export(run, out) -> tuple[int, str, str]:
    """convert.main(["--run", run, "--out", out]) in-process: (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = convert.main(["--run", str(run), "--out", str(out)])
    return rc, stdout.getvalue(), stderr.getvalue()


def tokens(tokenizer: TextTokenizer) -> jnp.ndarray:
    ids = tokenizer.encode("def add(a, b):\n    return a + b\n")[:16]
    return jnp.asarray([ids, ids[::-1]], jnp.int32)


logits = nnx.jit(lambda model, ids: model(ids))  # compiled once per config, not run op by op


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny preset's run (steps 3 and 5) exported into an existing empty --out."""
    root = tmp_path_factory.mktemp("convert_run")
    run, out = root / "run", root / "hf"
    saved = fake_run(str(run))
    out.mkdir()  # an empty folder is fine
    rc, printed, err = export(run, out)
    assert rc == 0, err
    return {"root": root, "run": run, "out": out, "saved": saved, "printed": printed,
            "loaded": load_run(str(run))}


def test_run_exported_as_hf_folder_round_trips(exported):
    out, printed = exported["out"], exported["printed"]
    names = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= names and any(n.endswith(".safetensors") for n in names)
    assert sorted(os.listdir(exported["root"])) == ["hf", "run"]  # no partial folder left behind
    assert printed.startswith(f"wrote {out} from step 5 of {exported['run']} (LongcatCausalLM, 2 layers")
    run = exported["loaded"]
    assert run.step == 5
    cfg, model = lj.load_hf(str(out))
    assert cfg == run.cfg and (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id) == (384, 1, 2)
    for got, want in zip(leaves(model), exported["saved"][5], strict=True):  # the newest step, exactly
        np.testing.assert_array_equal(got, want)
    ids = tokens(run.tokenizer)
    np.testing.assert_array_equal(logits(model, ids), logits(run.model, ids))


def test_exported_tokenizer_and_generation_config_as_transformers_reads_them(exported, tmp_path):
    out = str(exported["out"])
    ours = exported["loaded"].tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf(text)["input_ids"] == ours.encode(text), text
        assert hf.decode(ours.encode(text)) == ours.decode(ours.encode(text), skip_special_tokens=False)
    assert (hf.pad_token, hf.bos_token, hf.eos_token) == ("<pad>", "<s>", "</s>")
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert TextTokenizer.from_folder(out).encode(TEXTS[2]) == ours.encode(TEXTS[2])

    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 0)
    # byte for byte what transformers itself writes for these ids
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(tmp_path)
    assert json.loads((exported["out"] / "generation_config.json").read_text()) == \
        json.loads((tmp_path / "generation_config.json").read_text())


def test_flash_layout_run_loads_in_transformers(tmp_path):
    """A run whose preset has the Flash layout (a tiny one here: the tiny preset less what Flash lacks) loads
    in AutoModelForCausalLM with our logits."""
    import torch

    tiny = lj.Config.tiny
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lj.Config, "tiny", classmethod(lambda cls, **kw: tiny(**{**FLASH_TINY, **kw})))
        fake_run(str(tmp_path / "run"), steps=(1,))
        rc, printed, err = export(tmp_path / "run", tmp_path / "hf")
        run = load_run(str(tmp_path / "run"))
    assert rc == 0, err
    assert "(LongcatFlashForCausalLM, 2 layers" in printed
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(ref).__name__ == "LongcatFlashForCausalLM"
    ids = tokens(run.tokenizer)
    with torch.no_grad():
        got = ref(torch.tensor(np.asarray(ids))).logits.numpy()
    want = np.asarray(logits(run.model, ids))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_errors_are_one_line(exported, tmp_path):
    out = exported["out"]
    before = sorted(os.listdir(out))
    for target in (out, out / "config.json"):  # a non-empty folder, a file
        rc, printed, err = export(exported["run"], target)
        assert rc == 2 and not printed
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: --out {target} exists"), err
    assert sorted(os.listdir(out)) == before

    (tmp_path / "empty_run").mkdir()
    for run, why in ((tmp_path / "empty_run", "no checkpoint steps"),
                     (tmp_path / "missing", "no such folder")):
        rc, printed, err = export(run, tmp_path / "never")
        assert rc == 2 and not printed and not (tmp_path / "never").exists()
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: --run {run}: {why}"), err
    with pytest.raises(SystemExit):  # --hf writes Orbax: --to-hf makes no sense with it
        convert.main(["--hf", str(out), "--out", str(tmp_path / "x"), "--to-hf"])
