"""The fidelity study's rollouts (BAE, arXiv 2602.10231 §5.1): nested Monte-Carlo continuations of block 1.

For each prompt, G completions are sampled with the jitted sampler and scored by the structured
task. Each completion whose solution block is complete (an answer was parsed) is cut at the start
of block 1 (the parser's split, e.g. ``<analysis>`` or ``<c>``); the prompt plus that fixed
solution prefix, as the *sampled tokens*, becomes a new prompt and M confidence blocks are
sampled from it. Each continuation is scored on the full text (prefix + continuation) and its
block-1 reward kept. The mean of the M rewards estimates ``E[r_1 | x, X_sol]``;
:func:`jaxgrpo.evaluation.fidelity.fidelity_table` then compares each compute-free baseline's
advantage with the MC advantage ``r_1 - mean``.

Samples without a parsed answer have no solution prefix to condition on: they are invalid (left
out of the baselines and of the RMSE). A token that straddles the split (possible with BPE, never
with the character tokenizer) stays in the prefix.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from jaxgrpo.config import InputError
from jaxgrpo.evaluation import fidelity as fid
from jaxgrpo.rollout.sampler import bucket_length
from jaxgrpo.tasks import score_many
from jaxgrpo.tasks.structured import StructuredTask
from jaxgrpo.train import hostio, rollouts
from jaxgrpo.train.blocks import token_offsets


@dataclasses.dataclass(frozen=True)
class _Item:
    task: str
    record: dict
    uid: str


@dataclasses.dataclass
class NestedRollouts:
    """Host arrays of a fidelity study (P prompts, G samples, M continuations each)."""

    rewards: np.ndarray  # float64 [P, G] block-1 reward of each sampled completion
    correct: np.ndarray  # bool [P, G] the answer's correctness (the OCB outcome)
    confidence: np.ndarray  # float64 [P, G] q (NaN where missing)
    valid: np.ndarray  # bool [P, G] the solution block is complete
    mc_rewards: np.ndarray  # float64 [P, G, M] block-1 rewards of the continuations (NaN if invalid)
    mc_texts: list  # [P][G]: the M full texts (prefix + continuation), or None if invalid
    texts: list  # [P][G] sampled completions
    prefix_tokens: np.ndarray  # int [P, G] length of each solution prefix, in tokens

    @property
    def mc_mean(self) -> np.ndarray:
        return np.where(self.valid, np.nan_to_num(self.mc_rewards).mean(-1), 0.0)

    @property
    def mc_var(self) -> np.ndarray:
        m = self.mc_rewards.shape[-1]
        return np.where(self.valid, np.nan_to_num(self.mc_rewards).var(-1, ddof=1) if m > 1
                        else 0.0, 0.0)

    def table(self, *, kappa: float = 1.0) -> dict:
        return fid.fidelity_table(self.rewards, self.correct.astype(np.int64), self.mc_mean,
                                  self.valid, mc_var=self.mc_var,
                                  num_mc=int(self.mc_rewards.shape[-1]), kappa=kappa)


def nested_rollouts(policy, params, task: StructuredTask, records: Sequence[dict], *,
                    group_size: int, num_mc: int, max_new_tokens: int, key: jax.Array,
                    prompt_buckets: Sequence[int], temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, chunk: int = 32, stream=sys.stderr) -> NestedRollouts:
    """Samples G solutions per record, then M block-1 continuations of each solution prefix.

    Args:
      policy: a :class:`jaxgrpo.train.loop.Policy` (graph, tokenizer, pad and EOS ids).
      params: its parameters.
      task: the structured task (confidence format).
      records: the P prompts' records.
      group_size, num_mc: G and M.
      max_new_tokens: the completion budget of the first samples and of each continuation.
      key: PRNG key.
      prompt_buckets: prompt length buckets (a continuation's prompt is rounded up to one of
        these, or to a multiple of the largest).
      temperature, top_k, top_p: sampling settings (the same for both stages).
      chunk: solution prefixes per sampler call in the second stage.
      stream: progress lines go here (None: quiet).
    """
    if not isinstance(task, StructuredTask) or task.format != "confidence":
        raise InputError("the fidelity study needs a structured task in the 'confidence' format "
                         f"(e.g. 'confidence' with base=...), got {getattr(task, 'name', task)!r}")
    for name, v in (("group_size", group_size), ("num_mc", num_mc), ("chunk", chunk)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if num_mc < 2:
        raise ValueError(f"num_mc must be >= 2 (the MC noise needs a variance), got {num_mc!r}")
    if not records:
        raise InputError("records must hold at least one prompt (tasks.eval_prompts, --prompts)")
    tok = policy.tokenizer
    buckets = tuple(sorted(prompt_buckets))
    log = (lambda m: print(f"[fidelity] {m}", file=stream, flush=True)) if stream else None
    t0 = time.perf_counter()
    gen1 = policy.generator(num_samples=group_size, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p, buckets=buckets)
    items = [_Item("t", r, f"fidelity/{i}") for i, r in enumerate(records)]
    k1, k2 = jax.random.split(key)
    groups = rollouts.collect(
        items, tasks={"t": task}, task_index={"t": 0}, tokenizer=tok,
        generate=lambda t, m, k: gen1(params, t, m, k), key=k1, prompt_buckets=buckets,
        pad_id=policy.pad_id, score_fn=score_many,
    )
    p, g = groups.correct.shape
    rewards = groups.blocks[..., 1].astype(np.float64)
    conf = np.full((p, g), np.nan)
    valid = np.zeros((p, g), bool)
    cut = np.zeros((p, g), np.int64)
    prefixes = []  # (p, g, prompt+prefix token ids)
    for i in range(p):
        prompt_ids = groups.prompt_tokens[i][groups.prompt_mask[i]].tolist()
        for j in range(g):
            text = groups.texts[i][j]
            parse = task.parse(text, truncated=bool(groups.truncated[i, j]))
            if parse.confidence is not None:
                conf[i, j] = parse.confidence
            if parse.answers[0] is None:
                continue
            ids = groups.tokens[i, j][groups.mask[i, j]].tolist()
            offs = token_offsets(tok, ids, text)
            n = sum(1 for s, e in offs if e > s and s < parse.split)
            valid[i, j], cut[i, j] = True, n
            prefixes.append((i, j, prompt_ids + ids[:n]))
    if log:
        log(f"{p} prompts x {g} samples in {time.perf_counter() - t0:.1f} s; "
            f"{len(prefixes)} complete solutions; {num_mc} continuations each")
    gen2 = policy.generator(num_samples=num_mc, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p, buckets=buckets)
    mc = np.full((p, g, num_mc), np.nan)
    mc_texts = [[None] * g for _ in range(p)]
    for c0 in range(0, len(prefixes), chunk):
        part = prefixes[c0:c0 + chunk]
        width = bucket_length(max(len(x) for _, _, x in part), buckets)
        toks = np.full((chunk, width), policy.pad_id, np.int32)  # fixed rows: one compile
        mask = np.zeros((chunk, width), bool)
        for r, (_, _, x) in enumerate(part):
            toks[r, width - len(x):], mask[r, width - len(x):] = x, True
        mask[len(part):, -1] = True  # filler rows: one token, results dropped
        out = jax.device_get(gen2(params, toks, mask, jax.random.fold_in(k2, c0)))
        ct, cm = np.asarray(out.tokens), np.asarray(out.mask).astype(bool)
        ctr = np.asarray(out.truncated).astype(bool)
        flat = hostio.decode_completions(tok, ct[:len(part)].reshape(len(part) * num_mc, -1),
                                         cm[:len(part)].reshape(len(part) * num_mc, -1))
        recs, comps, cuts = [], [], []
        for r, (i, j, _) in enumerate(part):
            ids = groups.tokens[i, j][groups.mask[i, j]].tolist()[: cut[i, j]]
            head = tok.decode(ids, skip_special_tokens=True)
            for m in range(num_mc):
                recs.append(records[i])
                comps.append(head + flat[r * num_mc + m])
                cuts.append(bool(ctr[r, m]))
        scores = score_many(task, recs, comps, truncated=cuts)
        for r, (i, j, _) in enumerate(part):
            mc_texts[i][j] = comps[r * num_mc:(r + 1) * num_mc]
            for m in range(num_mc):
                s = scores[r * num_mc + m]
                mc[i, j, m] = s.blocks[1] if s.error is None and len(s.blocks) == 2 else 0.0
        if log:
            log(f"continuations {min(c0 + chunk, len(prefixes))}/{len(prefixes)} "
                f"({time.perf_counter() - t0:.0f} s)")
    return NestedRollouts(rewards=np.where(valid, rewards, 0.0), correct=groups.correct.copy(),
                          confidence=conf, valid=valid, mc_rewards=mc, mc_texts=mc_texts,
                          texts=groups.texts,
                          prefix_tokens=cut)
