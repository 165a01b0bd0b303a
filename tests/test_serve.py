"""serve.py and what it serves: greedy generation through the decode cache, the model sources of
`serving.load` (train.py checkpoints above all), and the command line end to end in a subprocess."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import httpx2 as httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import longcat_jax as lj
import serve
from longcat_jax.serving.load import LoadError, load_for_serving
from longcat_jax.training import data
from longcat_jax.training.run_checkpoint import RunCheckpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_greedy_generation_is_consistent_with_forward():
    cfg = lj.Config.tiny()
    model = lj.build_model(cfg, seed=0)
    prompt = jnp.asarray([[5, 17, 42, 9]], jnp.int32)
    new = lj.generate(model, prompt, 6)
    full = jnp.concatenate([prompt, new], axis=1)
    greedy = np.asarray(jnp.argmax(lj.forward(model, full).logits, -1))
    np.testing.assert_array_equal(greedy[0, 3:-1], np.asarray(new[0]))


# ------------------------------------------------------------------------------------------ checkpoints
def fake_run(run, steps=(3, 5)):
    """A run folder as train.py leaves it: run_config.json, tokenizer.json and a checkpoint per step whose
    state holds the model's parameters beside an optimizer state. Returns {step: params as numpy}."""
    texts = data.read_text_files(sorted(data.stdlib_files())[:4])
    bpe = data.train_bpe(texts, 300)
    os.makedirs(run, exist_ok=True)
    bpe.save(os.path.join(run, "tokenizer.json"))
    with open(os.path.join(run, "run_config.json"), "w") as f:
        json.dump({"preset": "tiny", "kernel_impl": "reference", "seed": 0}, f)
    cfg = lj.Config.tiny(vocab_size=384, eos_token_id=data.eos_id(bpe), bos_token_id=1)
    _, abstract = nnx.split(lj.abstract_model(cfg))
    saved = {}
    with RunCheckpointer(os.path.join(run, "checkpoints"), async_save=False, log=lambda s: None) as ckpt:
        for step in steps:
            rng = np.random.default_rng(step)
            params = jax.tree.map(lambda x, r=rng: jnp.asarray(r.standard_normal(x.shape).astype(x.dtype)),
                                  abstract)
            state = {"params": params, "opt_state": {"mu": jax.tree.map(jnp.zeros_like, params)},
                     "step": jnp.asarray(step)}
            ckpt.maybe_save(step, state, force=True)
            saved[step] = [np.asarray(x) for x in jax.tree.leaves(params)]
    return saved


def leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def test_load_checkpoint_step_folder_run_and_newest_good(tmp_path):
    run = str(tmp_path / "run")
    saved = fake_run(run)
    cfg, model, tokenizer, name = load_for_serving(run=run)  # no source: the newest step of the run
    assert (cfg.vocab_size, cfg.eos_token_id, name) == (384, 2, "longcat-tiny-run")
    assert tokenizer.decode(tokenizer.encode("def f(x): return x")) == "def f(x): return x"
    for got, want in zip(leaves(model), saved[5]):
        np.testing.assert_array_equal(got, want)
    _, model, _, _ = load_for_serving(checkpoint=os.path.join(run, "checkpoints", "3"))
    np.testing.assert_array_equal(leaves(model)[0], saved[3][0])
    for source in (run, os.path.join(run, "checkpoints")):
        np.testing.assert_array_equal(leaves(load_for_serving(checkpoint=source)[1])[0], saved[5][0])
    # a damaged newest step is reported and skipped
    victim = next(p for p in sorted((tmp_path / "run/checkpoints/5").rglob("*")) if p.is_file()
                  and p.stat().st_size > 16 and p.name != "integrity.json")
    victim.write_bytes(victim.read_bytes()[:-8])
    notes = []
    _, model, _, _ = load_for_serving(checkpoint=run, log=notes.append)
    np.testing.assert_array_equal(leaves(model)[0], saved[3][0])
    assert len(notes) == 1 and "unusable" in notes[0]
    with pytest.raises(LoadError, match="truncated|crc32"):
        load_for_serving(checkpoint=os.path.join(run, "checkpoints", "5"))


def test_load_errors(tmp_path):
    with pytest.raises(LoadError, match="make train"):
        load_for_serving(run=str(tmp_path))
    with pytest.raises(LoadError, match="no such folder"):
        load_for_serving(checkpoint=str(tmp_path / "missing"))
    with pytest.raises(LoadError, match="no checkpoint steps"):
        load_for_serving(checkpoint=str(tmp_path))
    with pytest.raises(LoadError, match="not a Hugging Face model folder"):
        load_for_serving(hf=str(tmp_path))
    with pytest.raises(LoadError, match="at most one"):
        load_for_serving(hf=str(tmp_path), preset="tiny")


def test_a_bfloat16_folder_keeps_its_weights_and_computes_in_float32_on_cpu(tmp_path):
    from longcat_jax.serving.text import save_tokenizer_folder

    cfg = lj.Config.tiny(param_dtype="bfloat16", dtype="bfloat16")
    lj.save_hf(lj.build_model(cfg, seed=0), str(tmp_path))
    save_tokenizer_folder(data.train_bpe(["def add(a, b):\n    return a + b\n"] * 20, 300), tmp_path)
    cfg, model, _, _ = load_for_serving(hf=str(tmp_path))
    assert (cfg.param_dtype, cfg.dtype, model.lm_head[...].dtype) == ("bfloat16", "float32", jnp.bfloat16)
    assert load_for_serving(hf=str(tmp_path), dtype="bfloat16")[0].dtype == "bfloat16"
    with pytest.raises(LoadError, match="unknown dtype 'float16'"):
        load_for_serving(hf=str(tmp_path), dtype="float16")


# --------------------------------------------------------------------------------------------- the CLI
def test_every_flag_has_help():
    for action in serve.build_parser()._actions:
        assert action.help, action.option_strings


def test_no_checkpoint_prints_a_one_line_hint(tmp_path, capsys):
    assert serve.main(["--run", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no checkpoint in") and "make train" in err[-1] and "--preset" in err[-1]


def test_busy_port_fails_before_loading(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve.main(["--preset", "tiny", "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve.main(["--preset", "tiny", "--max-num-seqs", "0"])


def test_serve_preset_end_to_end_and_sigterm_drains():
    """serve.py --preset tiny: ready line, /health, a completion; SIGTERM while a stream runs lets the stream
    finish, and the process exits 0."""
    cmd = [sys.executable, "serve.py", "--preset", "tiny", "--port", "0", "--max-num-seqs", "2",
           "--prefill-chunk", "16", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
        ready = re.match(r"serving (\S+) on (http://\S+)/v1", lines[-1])
        assert ready, "".join(lines)
        model, url = ready.groups()
        assert any("loaded in" in x for x in lines) and any("compiled in" in x for x in lines)
        with httpx.Client(base_url=url, timeout=180) as http:
            assert http.get("/health").status_code == 200
            r = http.post("/v1/completions", json={"model": model, "prompt": "def f(x):", "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            body = {"model": model, "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as stream:
                chunks = stream.iter_lines()
                assert next(c for c in chunks if c.startswith("data: "))
                proc.send_signal(signal.SIGTERM)
                rest = [c for c in chunks if c.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
        out = proc.stdout.read()
        assert "SIGTERM: draining" in out and out.rstrip().endswith("stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kv_cache_memory_sizes_the_pool(capsys):
    """--kv-cache-memory: a bad size and a budget too small for one request are one-line errors (before any
    compile); --num-pages and --kv-cache-memory exclude each other."""
    assert serve.main(["--preset", "tiny", "--port", "0", "--kv-cache-memory", "lots"]) == 2
    assert "error: --kv-cache-memory: bad memory size 'lots'" in capsys.readouterr().err
    assert serve.main(["--preset", "tiny", "--port", "0", "--kv-cache-memory", "1KiB"]) == 2
    assert "(--kv-cache-memory is too small)" in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit):
        serve.main(["--preset", "tiny", "--num-pages", "8", "--kv-cache-memory", "1GiB"])
