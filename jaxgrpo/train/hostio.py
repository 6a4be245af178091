"""Host-side glue between text and arrays: prompt encoding, completion decoding, scoring.

This is the one place that turns strings into padded token arrays and back. Everything here is
NumPy; device transfers happen in the loop.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` tokens (static shapes: one compile per bucket)."""
    i = bisect.bisect_left(list(buckets), n)
    if i == len(buckets):
        raise ValueError(
            f"a prompt has {n} tokens, more than the largest length bucket {buckets[-1]}; "
            "raise rollout.prompt_buckets or shorten the prompt template"
        )
    return int(buckets[i])


def encode_prompts(tokenizer, texts: Sequence[str], buckets: Sequence[int], pad_id: int):
    """Tokenises prompts and left-pads them to one length bucket.

    Returns ``(tokens int32 [P, Tp], mask bool [P, Tp])``.
    """
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]  # one batched call
    tp = bucket_length(max(len(x) for x in ids), buckets)
    tokens = np.full((len(ids), tp), pad_id, np.int32)
    mask = np.zeros((len(ids), tp), bool)
    for i, x in enumerate(ids):
        if len(x):
            tokens[i, tp - len(x) :] = x
            mask[i, tp - len(x) :] = True
    return tokens, mask


def encode_completions(tokenizer, texts: Sequence[str], length: int, pad_id: int, eos_id: int):
    """Tokenises gold completions, appends EOS, right-pads to ``length`` (truncating if longer).

    Returns ``(tokens int32 [B, length], mask bool [B, length])``.
    """
    tokens = np.full((len(texts), length), pad_id, np.int32)
    mask = np.zeros((len(texts), length), bool)
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for i, x in enumerate(ids):
        x = (list(x) + [eos_id])[:length]
        tokens[i, : len(x)] = x
        mask[i, : len(x)] = True
    return tokens, mask


def decode_completions(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Decodes ``[B, Tc]`` completion tokens (only the masked ones), special tokens dropped."""
    rows = [row[m.astype(bool)].tolist() for row, m in zip(tokens, mask, strict=True)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)
