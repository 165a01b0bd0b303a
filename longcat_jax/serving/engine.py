"""The continuous-batching engine (docs/architecture.md#serving): requests join and leave a running batch
between steps, over one paged cache.

Each step of the scheduler
  1. admits waiting requests while there is room (`max_num_seqs`), reusing the full pages of a cached prompt
     prefix (`pages.PagePool`);
  2. gives every running request its next tokens: one for a request that is decoding, and a chunk of at most
     `prefill_chunk` prompt tokens to the oldest one that is prefilling (so a long prompt never stalls the
     decoding streams for more than one chunk);
  3. takes the pages those tokens need, preempting the newest running request when the pool is empty (it
     gives its pages back and recomputes its tokens when it is admitted again);
  4. runs the prefill row and the decode rows through `paged_step`, each jit-compiled for a few bucketed
     shapes, all compiled ahead of traffic by `compile_all` (`step_programs`);
  5. samples a token for each request whose tokens are all in the cache, detokenizes it, applies the stop
     rules and reports a `RequestOutput`.
A batch of decode rows that all take the argmax of their logits (greedy, no penalty) is chained: the device
picks the tokens, and the next step is dispatched with them before the host reads them, so the host's work
on step n (reading, detokenizing, stop rules, reporting; the next dispatch) overlaps the device's work on
step n + 1, as vLLM's and SGLang's overlapped schedulers do. A request that a stop token or stop string ends
at step n then computed one token in step n + 1 that nobody reads; its pages are freed as usual (later
steps, which overwrite them, run after it). Nothing is chained while requests wait for admission or prefill.
`Engine.generate` runs the steps in the caller's thread (offline use, notebooks); `start` runs them in a
background thread that `submit` and `abort` feed (the HTTP server).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from longcat_jax.model.longcat import LongCat
from longcat_jax.model.paged_cache import init_paged_cache
from longcat_jax.serving.pages import PagePool, page_hashes
from longcat_jax.serving.params import (
    EngineStats,
    Generation,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from longcat_jax.serving.sampling import masked, sample, token_logprob
from longcat_jax.serving.settings import EngineSettings
from longcat_jax.serving.step_programs import StepPrograms
from longcat_jax.serving.text import IncrementalDetokenizer, StopStrings, TextTokenizer

log = logging.getLogger("longcat_jax.serving")


class QueueFull(RuntimeError):
    """The waiting queue is at `max_waiting`; the client should retry later."""


class EngineStopped(RuntimeError):
    """The engine is draining or stopped and takes no new requests."""


@dataclasses.dataclass
class _Launched:
    """A dispatched step whose results the host has not read yet."""

    rows: list  # (request, tokens fed)
    logits: jax.Array  # [B, V] at each row's last token
    chained: tuple[jax.Array, jax.Array | None] | None  # the device's pick and history, if it picked


class _Request:
    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, on_output, tokenizer,
                 order: int):
        self.id, self.prompt, self.params, self.on_output = request_id, prompt, params, on_output
        self.order = order  # admission order: the newest running request is preempted first
        self.output: list[int] = []
        self.pages: list[int] = []
        self.hashes: list[int] = []  # chained hash of each full page of tokens, as far as computed
        self.computed = 0  # tokens whose cache rows are written
        self.registered = 0  # leading pages registered in the prefix cache
        self.counts: dict[int, int] = collections.Counter()
        # numpy seeds are unsigned; any integer seed maps to one
        self.rng = np.random.default_rng(None if params.seed is None else params.seed % 2**64)
        self.detok = IncrementalDetokenizer(tokenizer, prompt) if tokenizer is not None else None
        self.stops = StopStrings(params.stop) if params.stop else None
        self.text: list[str] = []  # for `generate`
        self.logprobs: list[TokenLogprob] = []
        self.finished = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class Engine:
    """Continuous batching over a paged cache for one model.

    model: a LongCat; settings: EngineSettings; tokenizer: a TextTokenizer for text prompts, detokenized
    output and stop strings (None: token ids only).
    """

    def __init__(self, model: LongCat, settings: EngineSettings | None = None,
                 tokenizer: TextTokenizer | None = None):
        settings = (settings or EngineSettings()).checked()
        self.cfg, self.settings, self.tokenizer = model.cfg, settings, tokenizer
        self.pool = PagePool(settings.pool_pages, settings.page_size)
        self.cache = init_paged_cache(self.cfg, settings.pool_pages, settings.page_size)
        self._vocab_limit = tokenizer.vocab_size if tokenizer is not None else None
        self.programs = StepPrograms(model, self.settings, self.cache, self._vocab_limit)
        eos = {self.cfg.eos_token_id} | set(tokenizer.eos_token_ids if tokenizer is not None else ())
        self._eos = frozenset(eos)
        self.waiting: collections.deque[_Request] = collections.deque()
        self.running: list[_Request] = []
        self._ids: set[str] = set()
        self._order = 0
        self._inbox: list = []  # ("add", request) / ("abort", id), from other threads
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._draining = False
        self._totals = collections.Counter()
        self._in_flight: _Launched | None = None  # a chained decode step, dispatched, not yet read

    # --- requests ----------------------------------------------------------------------------------------

    def submit(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
               on_output: Callable[[RequestOutput], None]) -> None:
        """Queue a request; on_output receives its updates (from the engine's thread once `start`ed).

        Raises InvalidRequest (bad prompt or parameters), QueueFull or EngineStopped; nothing is queued then.
        """
        prompt = self._checked_prompt(prompt_ids, params)
        with self._lock:
            if self._draining:
                raise EngineStopped("the server is shutting down and takes no new requests")
            if len(self.waiting) + sum(op == "add" for op, _ in self._inbox) >= self.settings.max_waiting:
                raise QueueFull(f"{self.settings.max_waiting} requests are already waiting")
            if request_id in self._ids:
                raise InvalidRequest(f"request id {request_id!r} is already in use", "request_id")
            self._ids.add(request_id)
            self._order += 1
            self._inbox.append(("add", _Request(request_id, prompt, params, on_output, self.tokenizer,
                                                self._order)))
            self._lock.notify()

    def _checked_prompt(self, prompt_ids, params: SamplingParams) -> list[int]:
        params.checked(self.cfg.vocab_size)
        prompt = [int(t) for t in prompt_ids]
        limit = self.settings.max_model_len
        if not prompt:
            raise InvalidRequest("the prompt is empty: give at least one token", "prompt")
        bad = sorted({t for t in prompt if not 0 <= t < self.cfg.vocab_size})
        if bad:
            raise InvalidRequest(f"prompt token ids {bad[:8]} are outside the vocabulary "
                                 f"[0, {self.cfg.vocab_size})", "prompt")
        if len(prompt) >= limit:
            raise InvalidRequest(f"the prompt has {len(prompt)} tokens; this model's maximum context length "
                                 f"is {limit} tokens, prompt and output together", "prompt")
        if len(prompt) + params.max_tokens > limit:
            raise InvalidRequest(f"this model's maximum context length is {limit} tokens: the prompt has "
                                 f"{len(prompt)} and max_tokens asks for {params.max_tokens} more "
                                 f"(at most {limit - len(prompt)})", "max_tokens")
        return prompt

    def abort(self, request_id: str) -> None:
        """Stop a request (cancelled, or its client went away): its pages are freed and its last update has
        finish_reason "abort". Unknown or finished ids are ignored."""
        with self._lock:
            self._inbox.append(("abort", request_id))
            self._lock.notify()

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Generation]:
        """Run prompts (text, or token ids) to completion in this thread; results in prompt order."""
        if self._thread is not None:
            raise RuntimeError("generate() runs the engine in the caller's thread; this engine is started")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        results: dict[str, RequestOutput] = {}
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer; pass token ids or Engine(tokenizer=...)")
                prompt = self.tokenizer.encode(prompt)
            rid = f"generate-{self._order}-{i}"
            self.submit(rid, prompt, p, lambda out: results.__setitem__(out.request_id, out)
                        if out.finished else None)
            requests.append(rid)
        tracked = {op[1].id: op[1] for op in self._inbox if op[0] == "add"}
        while len(results) < len(requests):
            self.step()
        out = []
        for rid in requests:
            r, last = tracked[rid], results[rid]
            text = "".join(r.text) if self.tokenizer is not None else None
            out.append(Generation(text, list(r.output), last.finish_reason,
                                  r.logprobs if r.params.logprobs is not None else None, last.error))
        return out

    # --- the background thread ---------------------------------------------------------------------------

    def start(self) -> None:
        """Run the steps in a background thread (for `submit` from a server)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="longcat-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._inbox or self.running or self.waiting or self._draining):
                    self._lock.wait()
                if self._draining and not (self._inbox or self.running or self.waiting):
                    return
            self.step()

    def drain(self, timeout: float | None = None) -> None:
        """Refuse new requests, let the admitted ones finish (those left after `timeout` seconds are
        aborted), and stop the thread."""
        with self._lock:
            self._draining = True
            self._lock.notify()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread is not None and self._thread.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                with self._lock:
                    self._inbox.extend(("abort", r.id) for r in [*self.running, *self.waiting])
                deadline = None
            self._thread.join(0.05)
        self._thread = None

    def stats(self) -> EngineStats:
        t = self._totals
        return EngineStats(kv_pages_used=self.pool.used, kv_pages_total=self.pool.num_pages,
                           running=len(self.running), waiting=len(self.waiting) + len(self._inbox),
                           prefix_cache_hits=t["prefix_hits"], prompt_tokens=t["prompt"],
                           generation_tokens=t["generated"], preemptions=t["preempted"],
                           chained_steps=t["chained"], compiled_programs=len(self.programs))

    # --- one step ----------------------------------------------------------------------------------------

    def step(self) -> None:
        """One scheduling step: admit, plan, run the model, sample and report."""
        self._take_inbox()
        involved = []  # the rows of every step this call touches: a fault fails them all
        try:
            if self._in_flight is not None:
                launched, self._in_flight = self._in_flight, None
                involved += launched.rows
                chained = self._chain(launched)
                self._land(launched)
                if chained is not None:
                    involved += chained.rows
                    self._commit([(req, n) for req, n in chained.rows if not req.finished])
                    self._in_flight = chained
                    return
            self._admit()
            prefill, decode = self._plan()
            involved += prefill + decode
            for rows in (prefill, decode):
                if rows:
                    launched = self._launch(rows)
                    self._commit(rows)
                    if launched.chained is not None and not prefill and self._settled(rows):
                        self._in_flight = launched  # read at the next step, after dispatching its successor
                    else:
                        self._land(launched)
        except Exception as e:  # a fault in the step fails the requests in it, never the engine
            log.exception("engine step failed")
            self._in_flight = None
            for req, _ in involved:
                if not req.finished:
                    self._finish(req, "error", error=f"engine error: {type(e).__name__}: {e}")
            # The step may have consumed the donated cache: start from an empty one, and let the other
            # running requests recompute their rows.
            for req in list(self.running):
                self._preempt(req)
            self.pool = PagePool(self.settings.pool_pages, self.settings.page_size)
            self.cache = init_paged_cache(self.cfg, self.settings.pool_pages, self.settings.page_size)

    def _take_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for op, item in inbox:
            if op == "add":
                self.waiting.append(item)
                self._totals["prompt"] += len(item.prompt)
            else:
                req = next((r for r in [*self.running, *self.waiting] if r.id == item), None)
                if req is not None:
                    self._finish(req, "abort")

    def _admit(self) -> None:
        ps = self.settings.page_size
        while self.waiting and len(self.running) < self.settings.max_num_seqs and self.pool.available:
            req = self.waiting.popleft()
            tokens = req.tokens
            req.hashes = page_hashes(tokens, ps, req.hashes)
            # Reuse full pages only, and never the page holding the last token: its logits must be computed.
            req.pages = self.pool.lookup(req.hashes[: (len(tokens) - 1) // ps])
            req.computed = len(req.pages) * ps
            req.registered = len(req.pages)  # found by their hashes: registered already
            self._totals["prefix_hits"] += req.computed
            self.running.append(req)
            self.running.sort(key=lambda r: r.order)

    def _plan(self):
        """(prefill rows, decode rows): lists of (request, tokens to feed), with their pages taken. One prompt
        chunk per step, the oldest request's: rows of a program share a length, so a shorter chunk beside it
        would pad out to it at full cost; first come, first served also gives the first token soonest."""
        prefill, decode = [], []
        for req in list(self.running):
            if req not in self.running:  # preempted for an earlier request's pages
                continue
            pending = len(req.tokens) - req.computed
            n = 1 if pending == 1 else min(pending, self.settings.prefill_chunk)
            if n == 0 or (n > 1 and prefill):
                continue
            if not self._take_pages(req, req.computed + n):
                continue
            if pending == 1:
                decode.append((req, 1))
            else:
                prefill.append((req, n))
        return prefill, decode

    def _take_pages(self, req: _Request, upto: int) -> bool:
        """Pages for req's first `upto` tokens, preempting the newest running requests if the pool is empty;
        False if req itself had to give way."""
        need = math.ceil(upto / self.settings.page_size) - len(req.pages)
        while need > 0:
            page = self.pool.allocate()
            if page is None:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    return False
                continue
            req.pages.append(page)
            need -= 1
        return True

    def _preempt(self, req: _Request) -> None:
        log.info("preempting %s (%d tokens) for pages; it will be recomputed", req.id, len(req.tokens))
        self._totals["preempted"] += 1
        self.pool.release(req.pages)
        req.pages, req.computed = [], 0
        self.running.remove(req)
        self.waiting.appendleft(req)

    def compile_all(self, workers: int = 2) -> float:
        """Compile and run every step program now (`StepPrograms.compile_all`); returns the seconds taken."""
        t = time.perf_counter()
        self.cache = self.programs.compile_all(self.cache, workers)
        return time.perf_counter() - t

    def _chain(self, launched: _Launched) -> _Launched | None:
        """The next decode step of launched's rows, fed with the tokens the device picked, or None when the
        batch must change first: a row was aborted or reaches its length limit with launched's token, a
        request waits to be admitted or to prefill, or the rows need more pages than the pool has free."""
        rows, limit = launched.rows, self.settings.max_model_len
        if not self._settled(rows) or any(req.finished or len(req.output) + 1 >= req.params.max_tokens
                                          or len(req.tokens) + 1 >= limit for req, _ in rows):
            return None
        ps = self.settings.page_size
        if sum(max(0, req.computed // ps + 1 - len(req.pages)) for req, _ in rows) > self.pool.available:
            return None
        for req, _ in rows:
            self._take_pages(req, req.computed + 1)
        self._totals["chained"] += 1
        return self._launch(rows, fed=launched.chained)

    def _settled(self, rows) -> bool:
        """Whether rows are the whole running batch and no waiting request could join it."""
        s = self.settings
        return len(self.running) == len(rows) and not (
            self.waiting and len(self.running) < s.max_num_seqs and self.pool.available)

    def _launch(self, rows, fed=None) -> _Launched:
        """Dispatch one step for rows (request, tokens to feed). fed: the device's (tokens, history) for a
        chained step, whose rows feed the token after their last one (not yet in `req.tokens`)."""
        pages = max(len(req.pages) for req, _ in rows)
        B, T, W = shape = self.programs.shape(len(rows), [n for _, n in rows], pages)
        starts, new_lens = np.zeros(B, np.int32), np.zeros(B, np.int32)
        table = np.zeros((B, W), np.int32)
        for b, (req, n) in enumerate(rows):
            starts[b], new_lens[b] = req.computed, n
            table[b, : len(req.pages)] = req.pages
        tokens, history = fed if fed is not None else self._host_inputs(rows, B, T)
        logits, self.cache = self.programs.run(shape, tokens, starts, new_lens, table, self.cache, history)
        # Decode rows that take their argmax let the device pick, so that the next step can be chained.
        device_picks = all(n == 1 and req.params.plain_greedy for req, n in rows)
        picked = self.programs.argmax_next(logits, tokens, history) if device_picks else None
        return _Launched(rows, logits, picked)

    def _host_inputs(self, rows, B: int, T: int):
        """The tokens [B, T] each row feeds, and the n-gram history [B, H] before them (None: no n-grams)."""
        tokens = np.zeros((B, T), np.int32)
        H = self.programs.history_len
        history = np.zeros((B, H), np.int32) if H else None
        for b, (req, n) in enumerate(rows):
            all_tokens = req.tokens
            tokens[b, :n] = all_tokens[req.computed:req.computed + n]
            if H:
                before = all_tokens[max(0, req.computed - H):req.computed]
                history[b, H - len(before):] = before
        return tokens, history

    def _commit(self, rows) -> None:
        """Count dispatched rows as computed (later steps run after them) and register the pages they fill."""
        for req, n in rows:
            req.computed += n
            self._register_pages(req)

    def _land(self, launched: _Launched) -> None:
        """Read a step's results and give a token to each of its requests whose tokens are all computed."""
        rows = [(b, req) for b, (req, _) in enumerate(launched.rows)
                if not req.finished and req.computed == len(req.tokens)]
        if not rows:
            return
        want_logits = launched.chained is None or any(req.params.logprobs is not None for _, req in rows)
        logits = np.asarray(launched.logits) if want_logits else None
        if launched.chained is not None:
            chosen = np.asarray(launched.chained[0])[:, 0]
        for b, req in rows:
            p = req.params
            if launched.chained is None:
                token, lp = sample(logits[b], p, req.prompt, req.counts, req.rng, self._vocab_limit)
            else:
                token = int(chosen[b])
                lp = None if p.logprobs is None else token_logprob(masked(logits[b], self._vocab_limit),
                                                                   token, p.logprobs)
            self._emit_token(req, token, lp)

    def _register_pages(self, req: _Request) -> None:
        full = req.computed // self.settings.page_size
        req.hashes = page_hashes(req.tokens, self.settings.page_size, req.hashes, req.computed)
        for k in range(req.registered, full):  # only the pages that filled up in this step
            self.pool.register(req.pages[k], req.hashes[k])
        req.registered = max(req.registered, full)

    def _emit_token(self, req: _Request, token: int, lp: TokenLogprob | None) -> None:
        p = req.params
        req.output.append(token)
        req.counts[token] += 1
        self._totals["generated"] += 1
        if lp is not None:
            req.logprobs.append(lp)
        stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self._eos)
        text, stopped = "", False
        if req.detok is not None and not stop_token:
            text = req.detok.push(token)
            if req.stops is not None:
                text, stopped = req.stops.feed(text)
        reason = "stop" if stop_token or stopped else None
        full = len(req.tokens) >= self.settings.max_model_len
        if reason is None and (len(req.output) >= p.max_tokens or full):
            reason = "length"
        if reason is not None and req.detok is not None and not stopped:
            tail = req.detok.flush()
            if req.stops is not None:
                tail, stopped = req.stops.feed(tail)
                tail += "" if stopped else req.stops.flush()
            text += tail
        self._report(req, text, (token,), (lp,) if lp is not None else None, reason)

    def _report(self, req: _Request, text: str, tokens, logprobs, reason: str | None,
                error: str | None = None) -> None:
        if reason is not None:
            self._release(req)
        req.text.append(text)
        req.on_output(RequestOutput(req.id, text, tuple(tokens), logprobs, reason is not None, reason,
                                    len(req.prompt), len(req.output), error))

    def _finish(self, req: _Request, reason: str, error: str | None = None) -> None:
        self._report(req, "", (), None, reason, error)

    def _release(self, req: _Request) -> None:
        req.finished = True
        self.pool.release(req.pages)
        req.pages = []
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        with self._lock:
            self._ids.discard(req.id)
