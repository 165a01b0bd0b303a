"""The load generator of bench/serve.py: a server process in its own process group (started, polled on
/health until ready, stopped with SIGTERM then SIGKILL), and the streaming chat-completion client that drives
it with the official `openai` AsyncOpenAI client: per concurrency level an untimed warm-up wave, then the
timed requests, concurrency-limited, reduced to output tokens/s, time to first token and time per output
token (medians and p99), with the engine programs compiled while the timed requests ran where a counter is
given.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import time

import numpy as np
from serve_report import fmt_ms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process in its own process group: started, polled for readiness, stopped (SIGTERM, then
    SIGKILL) on exit, errors included."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_path: str, port: int, timeout: float):
        self.name, self.cmd, self.env, self.log_path, self.port = name, cmd, env, log_path, port
        self.timeout, self.proc, self.url = timeout, None, f"http://127.0.0.1:{port}"

    def __enter__(self):
        self.log = open(self.log_path, "w")
        print(f"[{self.name}] {' '.join(self.cmd)}  (log {self.log_path})", flush=True)
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self):
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                                   + self.tail())
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    ok = r.status == 200
                if ok:
                    self.startup_s = time.perf_counter() - self.t0
                    print(f"[{self.name}] ready after {self.startup_s:.1f} s", flush=True)
                    return
            time.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready after {self.timeout:.0f} s:\n" + self.tail())

    def tail(self, n: int = 30) -> str:
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def log_text(self) -> str:
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def __exit__(self, *exc):
        self.stop()


async def one_request(client, model: str, prompt: str, max_tokens: int, extra: dict) -> dict:
    t0 = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body=extra)
    times, usage, finish = [], None, None
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                times.append(now)
            if choice.finish_reason:
                finish = choice.finish_reason
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage is not None else len(times)
    return dict(start=t0, end=end, tokens=tokens, chunks=len(times), finish=finish,
                prompt_tokens=usage.prompt_tokens if usage is not None else None,
                ttft=times[0] - t0 if times else None,
                tpot=(times[-1] - times[0]) / (tokens - 1) if len(times) >= 2 and tokens > 1 else None)


async def run_wave(client, model, prompts, concurrency, max_tokens, extra) -> tuple[list, float]:
    sem = asyncio.Semaphore(concurrency)

    async def guarded(p):
        async with sem:
            return await one_request(client, model, p, max_tokens, extra)

    t = time.perf_counter()
    out = await asyncio.gather(*(guarded(p) for p in prompts), return_exceptions=True)
    return out, time.perf_counter() - t


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else None


def level_stats(results, wall: float, concurrency: int) -> dict:
    ok = [r for r in results if isinstance(r, dict)]
    errors = [f"{type(r).__name__}: {r}"[:300] for r in results if not isinstance(r, dict)]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    toks = [r["tokens"] for r in ok]
    return dict(concurrency=concurrency, requests=len(results), errors=errors, wall_s=wall,
                output_tokens=sum(toks), output_tokens_per_s=sum(toks) / wall,
                output_tokens_per_request=dict(min=min(toks, default=0), max=max(toks, default=0)),
                content_chunks_per_request=statistics.median([r["chunks"] for r in ok]) if ok else None,
                prompt_tokens_mean=statistics.mean(r["prompt_tokens"] for r in ok if r["prompt_tokens"])
                if ok and ok[0]["prompt_tokens"] else None,
                finish_reasons=sorted({str(r["finish"]) for r in ok}),
                ttft_median_s=pct(ttft, 50), ttft_p99_s=pct(ttft, 99),
                tpot_median_s=pct(tpot, 50), tpot_p99_s=pct(tpot, 99))


async def drive(server: Server, model: str, c: int, warm: list[str], timed: list[str], max_tokens, extra,
                count_compiles=None) -> dict:
    """One concurrency level c on server: an untimed warm-up wave (warm[0] alone, then warm[1:] at c at once,
    so that the server has compiled / allocated for that batch size), then the timed requests at c."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=1800)
    try:
        t = time.perf_counter()
        await run_wave(client, model, warm[:1], 1, max_tokens, extra)
        out, _ = await run_wave(client, model, warm[1:], c, max_tokens, extra)
        bad = [r for r in out if not isinstance(r, dict)]
        if bad:
            raise RuntimeError(f"{server.name}: warm-up request failed: {bad[0]!r}")
        warm_s = time.perf_counter() - t
        before = len(count_compiles()) if count_compiles else None
        out, wall = await run_wave(client, model, timed, c, max_tokens, extra)
    finally:
        await client.close()
    row = level_stats(out, wall, c)
    row["warmup_s"] = warm_s
    if count_compiles:
        new = count_compiles()[before:]
        row["programs_compiled_during_timed_requests"] = len(new)
        row["programs_compiled_during_timed_requests_log"] = new
    print(f"[{server.name}] {c:3d} streams x {len(timed):3d} requests: "
          f"{row['output_tokens_per_s']:8.1f} tok/s, "
          f"TTFT median {fmt_ms(row['ttft_median_s'])} p99 {fmt_ms(row['ttft_p99_s'])}, "
          f"TPOT median {fmt_ms(row['tpot_median_s'])} p99 {fmt_ms(row['tpot_p99_s'])}, "
          f"tokens/request {row['output_tokens_per_request']}, errors {len(row['errors'])}, "
          f"warm-up {warm_s:.1f} s"
          + (f", programs compiled while timed {row['programs_compiled_during_timed_requests']}"
             if count_compiles else ""), flush=True)
    return row
