"""The continuous-batching engine against the plain model's greedy `generate`, on the tiny preset (every
feature on: N-gram embedding, LSA with SI + CLI + HI, ScMoE)."""

import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import longcat_jax as lj
from longcat_jax.serving.engine import Engine, EngineSettings, EngineStopped, QueueFull
from longcat_jax.serving.params import InvalidRequest, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
# Lengths (+ 6 new tokens) either stay at or below the tiny preset's hi_min_len = 24 or start above it, so
# the linear cache of `generate` (HI by cache size) and the engine (HI by each sequence's length) agree.
LENGTHS = (30, 5, 12, 27)


@pytest.fixture(scope="module")
def model():
    return lj.build_model(lj.Config.tiny(vocab_size=384, eos_token_id=2), seed=0)


@pytest.fixture(scope="module")
def prompts():
    rs = np.random.RandomState(0)
    return [rs.randint(3, 384, n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [np.asarray(lj.generate(model, jnp.asarray([p], jnp.int32), 6))[0].tolist() for p in prompts]


def settings(**changes):
    base = dict(max_num_seqs=4, max_model_len=64, page_size=8, prefill_chunk=16)
    return EngineSettings(**{**base, **changes})


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, settings())


def test_greedy_equals_generate_alone_and_batched(engine, prompts, expected):
    assert engine.generate(prompts[:1], GREEDY)[0].token_ids == expected[0]
    outs = engine.generate(prompts, GREEDY)  # four at once, of different lengths, prefilled in chunks
    assert [o.token_ids for o in outs] == expected
    assert {o.finish_reason for o in outs} == {"length"}
    stats = engine.stats()
    assert stats.kv_pages_used == 0 and stats.running == stats.waiting == 0
    assert stats.chained_steps > 0  # decode steps fed by the device's argmax before the host read it
    # The second run found the first one's prompt pages in the prefix cache, and still gave the same tokens.
    assert stats.prefix_cache_hits >= sum((n - 1) // 8 * 8 for n in LENGTHS[:1])


def test_prefix_cache_hits_give_identical_output(engine, prompts, expected):
    before = engine.stats().prefix_cache_hits
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert engine.stats().prefix_cache_hits - before == sum((n - 1) // 8 * 8 for n in LENGTHS)


def test_output_does_not_depend_on_the_batch(engine, prompts):
    for params in (GREEDY, SEEDED):
        alone = engine.generate([prompts[2]], params)[0].token_ids
        batched = engine.generate([prompts[0], prompts[2], prompts[3]], params)[1].token_ids
        assert alone == batched
    other_seed = engine.generate([prompts[2]], SamplingParams(**{**SEEDED.__dict__, "seed": 8}))[0].token_ids
    assert other_seed != alone  # the seed is what fixes the draws


def test_preemption_under_a_tiny_pool_completes_every_request(model, prompts, expected):
    small = Engine(model, settings(num_pages=8))  # 64 tokens: one full request; these four need 13 pages
    outs = small.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    stats = small.stats()
    assert stats.preemptions > 0 and stats.kv_pages_used == 0


def test_a_long_prefill_does_not_stall_decoding(engine, prompts):
    got = []
    long_output = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    engine.submit("short", prompts[1], long_output, got.append)
    while not got:
        engine.step()
    engine.submit("long", list(range(3, 53)), GREEDY, got.append)  # 50 new tokens: four chunks of <= 16
    for _ in range(3):
        engine.step()
    short = [o for o in got if o.request_id == "short"]
    assert len(short) == 4 and not [o for o in got if o.request_id == "long"]
    engine.abort("short")
    engine.abort("long")
    engine.step()
    assert got[-1].finish_reason == "abort" and engine.stats().kv_pages_used == 0


def test_a_stop_or_an_abort_while_the_next_step_is_in_flight(engine, prompts, expected):
    """A chained step computes one token past a stop that nobody reads; an abort lands mid-chain. Neither
    leaks a page or changes the next request's output."""
    chained = engine.stats().chained_steps
    stop_at = expected[0][2]
    out = engine.generate([prompts[0]], SamplingParams(max_tokens=6, temperature=0,
                                                       stop_token_ids=(stop_at,)))[0]
    assert out.token_ids == expected[0][:3] and out.finish_reason == "stop"
    assert engine.stats().chained_steps >= chained + 2 and engine.stats().kv_pages_used == 0
    got, chained = [], engine.stats().chained_steps
    engine.submit("aborted", prompts[1], GREEDY, got.append)
    while engine.stats().chained_steps < chained + 2:
        engine.step()
    engine.abort("aborted")
    engine.step()
    assert got[-1].finish_reason == "abort" and engine.stats().kv_pages_used == 0
    assert [t for o in got for t in o.token_ids] == expected[1][:len(got) - 1]


def test_bad_requests(engine, prompts, expected):
    bad = [([], GREEDY, "prompt"), ([1, 384], GREEDY, "prompt"), ([1] * 64, GREEDY, "prompt"),
           ([1] * 60, SamplingParams(max_tokens=5), "max_tokens"), ([1], SamplingParams(top_p=0), "top_p"),
           ([1], SamplingParams(temperature=-1), "temperature")]
    for prompt, params, param in bad:
        with pytest.raises(InvalidRequest) as e:
            engine.submit("bad", prompt, params, print)
        assert e.value.param == param
    assert engine.generate([prompts[1]], GREEDY)[0].token_ids == expected[1]  # still serving


def test_logprobs(engine, prompts, expected):
    out = engine.generate([prompts[1]], SamplingParams(max_tokens=3, temperature=0, logprobs=2,
                                                       ignore_eos=True))[0]
    assert [lp.token_id for lp in out.logprobs] == expected[1][:3]
    for lp in out.logprobs:  # greedy: the chosen token is the most likely one
        assert lp.top[0][0] == lp.token_id and lp.top[0][1] == pytest.approx(lp.logprob)
        assert lp.logprob <= 0 and lp.top[0][1] >= lp.top[1][1]


def test_background_thread_queue_and_drain(model, prompts, expected):
    eng = Engine(model, settings(max_waiting=2))
    done = {}

    def collect(out):
        done.setdefault(out.request_id, []).append(out)

    eng.submit("a", prompts[1], GREEDY, collect)
    eng.submit("b", prompts[2], GREEDY, collect)
    with pytest.raises(QueueFull):
        eng.submit("c", prompts[3], GREEDY, collect)
    eng.start()
    eng.drain(timeout=120)
    with pytest.raises(EngineStopped):
        eng.submit("d", prompts[3], GREEDY, collect)
    assert [t for o in done["a"] for t in o.token_ids] == expected[1]
    assert done["b"][-1].finished and eng.stats().kv_pages_used == 0


def test_dense_model_equals_generate(prompts):
    """A model without the indexer takes the same engine (absorbed MLA over every cached row)."""
    cfg = lj.Config.tiny(vocab_size=384, eos_token_id=2, use_indexer=False, si_enabled=False)
    model = lj.build_model(cfg, seed=0)
    want = np.asarray(lj.generate(model, jnp.asarray([prompts[0]], jnp.int32), 4))[0].tolist()
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    assert Engine(model, settings()).generate([prompts[0]], greedy)[0].token_ids == want


def test_bfloat16_weights_computed_in_float32_equal_generate(prompts):
    """serve.py's default for a bfloat16 checkpoint on CPU: the weights stay bfloat16, the step computes in
    float32 (its CPU kernels widen the weights as they read them; the plain model casts them first)."""
    cfg = lj.Config.tiny(vocab_size=384, eos_token_id=2, param_dtype="bfloat16", dtype="float32")
    model = lj.build_model(cfg, seed=0)
    assert model.lm_head[...].dtype == jnp.bfloat16
    want = np.asarray(lj.generate(model, jnp.asarray([prompts[0]], jnp.int32), 4))[0].tolist()
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    assert Engine(model, settings()).generate([prompts[0]], greedy)[0].token_ids == want


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(model, prompts, expected):
    eng = Engine(model, settings())
    real_program = eng.programs.program
    eng.programs.program = lambda shape: lambda *a: (_ for _ in ()).throw(RuntimeError("injected"))
    got = []
    eng.submit("doomed", prompts[1], GREEDY, got.append)
    eng.step()
    assert got[-1].finish_reason == "error" and "injected" in got[-1].error
    eng.programs.program = real_program
    assert eng.generate([prompts[1]], GREEDY)[0].token_ids == expected[1]
    assert eng.stats().kv_pages_used == 0


def test_compile_all_covers_every_step(model, prompts, expected, monkeypatch, caplog):
    """After `compile_all` nothing compiles: every shape the scheduler can ask for is among the buckets, and
    the device's greedy pick was compiled for the programs' own output. Its warm-up runs leave the cache as
    they found it (here random rows, as free pages hold stale ones)."""
    eng = Engine(model, settings(max_num_seqs=2, max_model_len=40, prefill_chunk=12))
    shapes = eng.programs.bucket_shapes()
    assert (1, 1, 5) in shapes and (2, 1, 5) in shapes and (1, 12, 5) in shapes and (1, 8, 5) in shapes
    keys = iter(jax.random.split(jax.random.key(0), 3))
    eng.cache = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype), eng.cache)
    before = jax.tree.map(np.asarray, eng.cache)
    eng.compile_all()
    assert eng.stats().compiled_programs == len(shapes)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, eng.cache), before)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        outs = eng.generate(prompts[1:3], GREEDY)
    assert [o.token_ids for o in outs] == expected[1:3]
    # generate runs the steps in this thread: an engine of another test may compile in its own
    compiled = [r.getMessage() for r in caplog.records if r.thread == threading.get_ident()
                and r.getMessage().startswith("Finished XLA compilation")]
    assert not compiled and eng.stats().compiled_programs == len(shapes)
    # Off CPU a kernel could read a page past the pool out of bounds: one run, no real row, pages in the pool.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    ((tokens, new_lens, table, history),) = eng.programs._warm_up_inputs((2, 1, 5), np.random.default_rng(0))
    assert not new_lens.any() and not table.any()


def test_chunk_buckets():
    from longcat_jax.serving.step_programs import chunk_bucket

    assert [chunk_bucket(n, 256) for n in (2, 9, 32, 33, 135, 250, 256)] == [8, 16, 32, 64, 160, 256, 256]
    assert chunk_bucket(100, 48) == 48
