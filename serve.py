"""Serve LongCat over an OpenAI-compatible HTTP API (vLLM-style), on the continuous-batching engine.

    python serve.py                                   # the newest checkpoint of runs/default (`make train`)
    python serve.py --checkpoint runs/small --port 8001
    python serve.py --hf /path/to/LongCat-Flash-Lite --max-model-len 8192 --api-key secret
    python serve.py --preset tiny                     # random weights, a small BPE: for trying the API

Then e.g. `curl localhost:8000/v1/completions -H 'Content-Type: application/json'
-d '{"model": "longcat-tiny-default", "prompt": "def fibonacci(n):", "max_tokens": 32}'` or any OpenAI client
with base_url http://HOST:PORT/v1. Routes: /v1/completions, /v1/chat/completions, /v1/models, /health,
/metrics. SIGTERM or Ctrl-C drains: new requests get 503, running ones finish, then the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

import jax
import uvicorn

import longcat_jax as lj
from longcat_jax.serving.api import build_app
from longcat_jax.serving.engine import Engine, EngineSettings
from longcat_jax.serving.load import DTYPES, LoadError, load_for_serving
from longcat_jax.serving.params import SamplingParams

COMPILE_CACHE = os.path.expanduser("~/.cache/longcat-jax/xla")
DEFAULT_MAX_MODEL_LEN = 2048
DRAIN_JOIN_S = 5.0  # after the HTTP server has stopped: how long the exit waits for the engine thread


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where the help says it itself or there is none (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve LongCat over an OpenAI-compatible HTTP API.",
                                formatter_class=_Help)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--hf", metavar="DIR", help="a Hugging Face LongCat folder (weights and tokenizer)")
    src.add_argument("--checkpoint", metavar="DIR",
                     help="a train.py checkpoint: RUN/checkpoints/STEP, RUN/checkpoints (newest good step) "
                          "or RUN")
    src.add_argument("--preset", choices=lj.Config.PRESETS,
                     help="random weights of a preset, with a small BPE (trying the API without a model)")
    p.add_argument("--run", default="runs/default", help="run folder served when no source is given")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: "
                   "$LONGCAT_API_KEY; neither: no key)")
    p.add_argument("--served-model-name", help="the model name clients send (default: from the source)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests in the running batch")
    p.add_argument("--max-model-len", type=int,
                   help=f"prompt + output tokens per request (default: {DEFAULT_MAX_MODEL_LEN}, at most the "
                        "model's max_position_embeddings)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
    pool = p.add_mutually_exclusive_group()
    pool.add_argument("--num-pages", type=int,
                      help="KV-cache pages in the pool (default: max-num-seqs full-length requests)")
    pool.add_argument("--kv-cache-memory", metavar="SIZE",
                      help="the pool as a memory budget instead of a page count, e.g. 2GiB, 512MiB, 1.5GB")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per engine step")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="queued requests beyond which new ones get 429")
    p.add_argument("--max-n", type=int, default=16, help="the largest n (choices per prompt) of a request")
    p.add_argument("--kernel-impl", default="auto", choices=("auto", "xla", "pallas", "reference"),
                   help="LSA and N-gram implementation (see pallas_kernels/)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="compute dtype of activations and the KV cache; the weights stay as stored (auto: "
                        "float32 on CPU, where the serving kernels read bfloat16 weights as they are, else "
                        "the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="initialisation of --preset weights")
    p.add_argument("--drain-timeout", type=float, default=600.0,
                   help="seconds SIGTERM waits for running requests before aborting them")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server and engine log level")
    p.add_argument("--no-precompile", action="store_true",
                   help="compile and first run each step shape when traffic needs it, not all at start-up")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep compiled programs in the persistent cache (~/.cache/longcat-jax/xla)")
    return p


def _phase(text: str) -> float:
    print(text, file=sys.stderr, flush=True)
    return time.perf_counter()


def _done(t0: float, text: str = "done") -> None:
    print(f"  {text} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def _checked(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    for name in ("max_num_seqs", "page_size", "prefill_chunk", "max_waiting", "max_n"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("max_model_len", "num_pages"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.port < 65536:
        p.error("--port must be in [0, 65535]")
    return args


def _num_pages(args: argparse.Namespace, cfg: lj.Config) -> int | None:
    """--num-pages, or the pages --kv-cache-memory holds (`paged_cache.page_bytes` per page)."""
    if args.kv_cache_memory is None:
        return args.num_pages
    from longcat_jax.memory_plan import parse_bytes
    from longcat_jax.model.paged_cache import page_bytes

    return parse_bytes(args.kv_cache_memory) // page_bytes(cfg, args.page_size)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a busy port fails at once, not minutes later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _warm_up(engine, tokenizer) -> str | None:
    """One short greedy request, so the first client does not wait for the prefill and decode compiles;
    the engine's error if it failed (a kernel that does not run here, say)."""
    done, last = threading.Event(), []

    def on_output(out) -> None:
        if out.finished:
            last.append(out)
            done.set()

    prompt = tokenizer.encode("Hello") or [0]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine.submit("warm-up", prompt, params, on_output)
    done.wait()
    return last[0].error or "engine error" if last[0].finish_reason == "error" else None


def main(argv=None) -> int:
    """Parse `argv`, load, compile and serve until SIGTERM / SIGINT; the exit status (2: nothing to serve)."""
    parser = build_parser()
    args = _checked(parser, parser.parse_args(argv))
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("longcat_jax").setLevel(args.log_level.upper())  # engine compiles and preemptions
    if not args.no_compile_cache and jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)  # a restart loads, not compiles
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    with sock:
        try:
            return _serve(args, sock)
        except KeyboardInterrupt:  # Ctrl-C while loading or compiling (once serving, uvicorn drains)
            print("interrupted", file=sys.stderr)
            return 130


def _serve(args: argparse.Namespace, sock: socket.socket) -> int:
    source = (f"--hf {args.hf}" if args.hf else f"--checkpoint {args.checkpoint}" if args.checkpoint
              else f"--preset {args.preset}" if args.preset else f"the newest checkpoint of {args.run}")
    t = _phase(f"loading {source}")
    try:
        cfg, model, tokenizer, name = load_for_serving(hf=args.hf, checkpoint=args.checkpoint,
                                                       preset=args.preset, run=args.run,
                                                       kernel_impl=args.kernel_impl, dtype=args.dtype,
                                                       seed=args.seed)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _done(t, f"{name}: {cfg.num_layers} layers, vocabulary {cfg.vocab_size}, {cfg.param_dtype} weights, "
             f"{cfg.dtype} compute, loaded")
    name = args.served_model_name or name
    max_len = args.max_model_len or min(DEFAULT_MAX_MODEL_LEN, cfg.max_position_embeddings)
    if max_len > cfg.max_position_embeddings:
        print(f"error: --max-model-len {max_len} exceeds the model's max_position_embeddings "
              f"{cfg.max_position_embeddings}", file=sys.stderr)
        return 2
    try:
        num_pages = _num_pages(args, cfg)
    except ValueError as e:
        print(f"error: --kv-cache-memory: {e}", file=sys.stderr)
        return 2
    try:
        settings = EngineSettings(max_num_seqs=args.max_num_seqs, max_model_len=max_len,
                                  page_size=args.page_size, num_pages=num_pages,
                                  prefill_chunk=args.prefill_chunk, max_waiting=args.max_waiting).checked()
    except ValueError as e:
        print(f"error: {e}" + (" (--kv-cache-memory is too small)" if args.kv_cache_memory else ""),
              file=sys.stderr)
        return 2
    engine = Engine(model, settings, tokenizer=tokenizer)
    del model  # on CPU the engine keeps its own per-layer copy of the weights (model.longcat.jit_paged_step)
    if not args.no_precompile:
        t = _phase(f"compiling and warming up: {len(engine.programs.bucket_shapes())} step programs "
                   f"(engine of {settings.max_num_seqs} sequences x {max_len} tokens, "
                   f"{settings.pool_pages} pages of {settings.page_size})")
        engine.compile_all()
        _done(t, "compiled")
    t = _phase("warm-up request")
    engine.start()
    error = _warm_up(engine, tokenizer)
    if error is not None:
        print(f"error: the warm-up request failed: {error}", file=sys.stderr)
        return 1
    _done(t)
    api_key = args.api_key or os.environ.get("LONGCAT_API_KEY") or None
    app = build_app(engine, tokenizer, model_name=name, api_key=api_key, max_n=args.max_n)
    host = f"[{args.host}]" if ":" in args.host else args.host
    server = _Server(uvicorn.Config(app, log_level=args.log_level, timeout_keep_alive=5),
                     ready=f"serving {name} on http://{host}:{sock.getsockname()[1]}/v1",
                     on_stop=lambda sig: _drain(app, engine, sig, args.drain_timeout))
    server.run(sockets=[sock])
    # uvicorn returns once every open response is complete, so nothing is left that a client waits for; the
    # engine thread is a daemon, so a drain that does not come back in a few seconds need not hold the exit.
    drainer = server.drainer or _drain(app, engine, None, timeout=0)
    drainer.join(DRAIN_JOIN_S)
    print("stopped", file=sys.stderr, flush=True)
    return 0


def _drain(app, engine, sig: int | None, timeout: float) -> threading.Thread:
    """Stop taking requests (503 and /health 503) and let the running ones finish, in the background: uvicorn
    meanwhile stops listening and waits for open responses."""
    if sig is not None:
        print(f"{signal.Signals(sig).name}: draining (running requests finish, new ones get 503); "
              "Ctrl-C again to quit at once", file=sys.stderr, flush=True)
    app.state.server.draining = True
    thread = threading.Thread(target=engine.drain, kwargs={"timeout": timeout}, name="drain", daemon=True)
    thread.start()
    return thread


class _Server(uvicorn.Server):
    """uvicorn.Server that prints a ready line, drains the engine on the first signal, and exits 0 after it.

    uvicorn re-raises the signal it caught once it has shut down (so the process dies of it); a graceful
    drain is the expected end of a server here, so serve.py exits 0 instead."""

    def __init__(self, config: uvicorn.Config, *, ready: str,
                 on_stop: Callable[[int], threading.Thread]):
        super().__init__(config)
        self.ready, self.on_stop = ready, on_stop
        self.drainer: threading.Thread | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(self.ready, file=sys.stderr, flush=True)

    def handle_exit(self, sig: int, frame) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        getattr(self, "_captured_signals", []).clear()
        if first:
            self.drainer = self.on_stop(sig)


if __name__ == "__main__":
    sys.exit(main())
