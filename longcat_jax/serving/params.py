"""What a request asks of the engine (SamplingParams) and what the engine reports back (RequestOutput, a
finished `Generation`, the engine's `EngineStats`)."""

from __future__ import annotations

import dataclasses


class InvalidRequest(ValueError):
    """A request the engine cannot take; `param` names the offending field (the OpenAI error's `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling, as vLLM names it. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages every token of the prompt and the output (CTRL's rule)
    presence_penalty: float = 0.0  # subtracted once from the logit of each token already generated
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence in the output
    seed: int | None = None  # the same seed and request give the same output, whatever else is batched
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the k most likely

    MAX_LOGPROBS = 20

    def checked(self, vocab_size: int) -> SamplingParams:
        """self, or InvalidRequest naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}",
                                 "max_tokens")
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = off), got {self.top_k}", "top_k")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.repetition_penalty <= 0:
            raise InvalidRequest(f"repetition_penalty must be > 0, got {self.repetition_penalty}",
                                 "repetition_penalty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if self.logprobs is not None and not 0 <= self.logprobs <= self.MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs must be in [0, {self.MAX_LOGPROBS}], got {self.logprobs}",
                                 "logprobs")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})",
                                 "stop_token_ids")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must not be empty", "stop")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """The next token is the argmax of the model's own logits (greedy, no penalty): the device can pick it
        and feed it to the next step before the host has read it."""
        return (self.greedy and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the `logprobs` most likely (token id, logprob), best first


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """One update of a request: what is new since the previous update, and the totals so far."""

    request_id: str
    text: str  # new text (never half a UTF-8 character; held back while it may start a stop string)
    token_ids: tuple[int, ...]  # new tokens
    logprobs: tuple[TokenLogprob, ...] | None  # one per new token when asked for
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or "error" once finished
    prompt_tokens: int
    completion_tokens: int  # generated so far
    error: str | None = None  # with finish_reason "error"


@dataclasses.dataclass(frozen=True)
class EngineStats:
    kv_pages_used: int
    kv_pages_total: int
    running: int
    waiting: int
    prefix_cache_hits: int  # prompt tokens whose cache rows came from the prefix cache (total)
    prompt_tokens: int  # total
    generation_tokens: int  # total
    preemptions: int  # total: requests that gave their pages back to be recomputed later
    chained_steps: int  # total: decode steps dispatched before the host read the tokens they feed
    compiled_programs: int


@dataclasses.dataclass(frozen=True)
class Generation:
    """One finished request of `Engine.generate`."""

    text: str | None  # None without a tokenizer
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
