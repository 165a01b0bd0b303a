"""Choosing the next token from one request's logits: penalties, temperature, top-k, top-p, min-p, seeded
draws and logprobs, as vLLM defines them (docs/architecture.md#sampling).

Each request samples on the host from its own row of the step's logits with its own random generator, so the
same seed and request give the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import numpy as np

from longcat_jax.serving.params import SamplingParams, TokenLogprob


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x)
    return x - np.log(np.sum(np.exp(x)))


def apply_penalties(logits: np.ndarray, params: SamplingParams, prompt_ids, output_counts: dict[int, int]):
    """Repetition penalty over the prompt and output tokens (positive logits divided, negative multiplied);
    presence and frequency penalties over the output tokens."""
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.concatenate([np.asarray(prompt_ids, np.int64),
                                         np.fromiter(output_counts, np.int64, len(output_counts))]))
        seen = seen[seen < logits.shape[0]]
        vals = logits[seen]
        logits[seen] = np.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if output_counts and (params.presence_penalty or params.frequency_penalty):
        ids = np.fromiter(output_counts, np.int64, len(output_counts))
        counts = np.fromiter(output_counts.values(), np.float32, len(output_counts))
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts
    return logits


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution to draw from: softmax(logits / temperature) restricted by top-k, top-p and min-p."""
    x = logits / params.temperature
    if 0 < params.top_k < x.shape[0]:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x = np.where(x >= kth, x, -np.inf)
    p = np.exp(x - np.max(x))
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        keep = cumulative - p[order] < params.top_p  # the smallest prefix whose mass reaches top_p
        mask = np.zeros_like(p, bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
    if params.min_p > 0:
        p = np.where(p >= params.min_p * p.max(), p, 0.0)
    return p / p.sum()


def sample(logits: np.ndarray, params: SamplingParams, prompt_ids, output_counts: dict[int, int],
           rng: np.random.Generator, vocab_limit: int | None = None) -> tuple[int, TokenLogprob | None]:
    """The next token for one request from its logits [V] (f32), and its logprobs when asked for.

    vocab_limit: ids at or above it (a model vocabulary padded beyond its tokenizer's) are never chosen.
    rng: the request's generator (unused when greedy).
    """
    raw = masked(logits, vocab_limit)
    x = apply_penalties(raw.copy(), params, prompt_ids, output_counts)
    if params.greedy:
        token = int(np.argmax(x))
    else:
        p = filtered_probs(x, params)
        token = int(rng.choice(p.shape[0], p=p))
    return token, None if params.logprobs is None else token_logprob(raw, token, params.logprobs)


def masked(logits: np.ndarray, vocab_limit: int | None) -> np.ndarray:
    """logits as f32 with the padding ids (>= vocab_limit) at -inf: neither chosen nor listed in logprobs."""
    raw = np.array(logits, np.float32)
    if vocab_limit is not None and vocab_limit < raw.shape[0]:
        raw[vocab_limit:] = -np.inf
    return raw


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """token's logprob and the k most likely, from the model's own logits (before penalties and temperature),
    as vLLM reports them by default."""
    lp = log_softmax(logits.astype(np.float64))
    top = np.argsort(-lp, kind="stable")[:k]
    return TokenLogprob(token, float(lp[token]), tuple((int(t), float(lp[t])) for t in top))
