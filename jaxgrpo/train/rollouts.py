"""Roll out a set of prompts, verify the completions on the host, and keep the results as arrays.

``collect(...)`` is the stage between the task sampler and the advantages: prompts in, one
:class:`Groups` out (``[P, G]`` rewards, correctness and the padded token arrays the train step
needs). DAPO's dynamic sampling and MT-GRPO's ratio-preserving sampler call it repeatedly and
keep the groups they want with :meth:`Groups.take`. :class:`GroupStream` is the streaming form:
prompts fed to a paged-engine session, each finished prompt scored and handed to the sampler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxgrpo.data import Group
from jaxgrpo.rollout import Rollout
from jaxgrpo.train import hostio
from jaxgrpo.train.blocks import rollout_block_ids


@dataclasses.dataclass
class Groups:
    """P prompts with G scored completions each (host NumPy arrays)."""

    task_ids: np.ndarray  # int32 [P]
    items: list  # [P] task-sampler items (task name, record, uid)
    prompt_tokens: np.ndarray  # int32 [P, Tp]
    prompt_mask: np.ndarray  # bool [P, Tp]
    tokens: np.ndarray  # int32 [P, G, Tc]
    mask: np.ndarray  # bool [P, G, Tc]
    logprobs: np.ndarray  # float32 [P, G, Tc] sampler log-probs
    truncated: np.ndarray  # bool [P, G]
    rewards: np.ndarray  # float32 [P, G]
    correct: np.ndarray  # bool [P, G]
    errors: np.ndarray  # bool [P, G] verifier errors (reward forced to 0)
    texts: list  # [P][G] decoded completions
    blocks: np.ndarray  # float32 [P, G, K] per-block rewards (K = 0 for unstructured tasks)
    block_ids: np.ndarray  # int32 [P, G, Tc] token block ids, -1 outside blocks (or not asked)

    def take(self, idx) -> Groups:
        idx = np.asarray(idx, dtype=np.int64)
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]
        return Groups(**out)

    @staticmethod
    def concat(parts: Sequence[Groups]) -> Groups:
        """Stacks groups along P. Prompt arrays are re-left-padded to the longest one."""
        tp = max(g.prompt_tokens.shape[1] for g in parts)

        def lpad(a, fill):
            pad = tp - a.shape[1]
            return np.pad(a, ((0, 0), (pad, 0)), constant_values=fill) if pad else a

        out = {}
        for f in dataclasses.fields(Groups):
            vals = [getattr(g, f.name) for g in parts]
            if f.name == "prompt_tokens":
                vals = [lpad(v, 0) for v in vals]
            elif f.name == "prompt_mask":
                vals = [lpad(v, False) for v in vals]
            out[f.name] = np.concatenate(vals) if isinstance(vals[0], np.ndarray) else sum(vals, [])
        return Groups(**out)


def collect(
    items: Sequence,
    *,
    tasks: dict,
    task_index: dict[str, int],
    tokenizer,
    generate: Callable,
    key: jax.Array,
    prompt_buckets: Sequence[int],
    pad_id: int,
    score_fn: Callable,
    with_blocks: bool = False,
    eos_ids: Sequence[int] = (),
    max_prompts: int | None = None,
) -> Groups:
    """Rolls out ``items`` (task-sampler items with ``.task`` and ``.record``) and scores them.

    ``generate(prompt_tokens, prompt_mask, key)`` returns a rollout with ``tokens``, ``logprobs``,
    ``mask`` and ``truncated`` laid out ``[P, G, ...]``; ``score_fn(task, records, completions)``
    returns one score per completion (``reward``, ``correct``, ``error``, ``blocks``).
    ``with_blocks`` maps the structured parser's blocks onto the sampled tokens (BAE; every task
    must then be a structured task); otherwise ``block_ids`` is all -1.
    ``max_prompts`` rolls the prompts out ``max_prompts`` at a time (see :func:`generate_chunked`).
    """
    texts = [tasks[it.task].prompt(it.record) for it in items]
    ptoks, pmask = hostio.encode_prompts(tokenizer, texts, prompt_buckets, pad_id)
    out = generate_chunked(generate, ptoks, pmask, key, max_prompts)
    tokens, cmask = np.asarray(out.tokens), np.asarray(out.mask).astype(bool)
    p, g, _ = tokens.shape
    flat_texts = hostio.decode_completions(
        tokenizer, tokens.reshape(p * g, -1), cmask.reshape(p * g, -1)
    )
    rewards = np.zeros((p, g), np.float32)
    correct = np.zeros((p, g), bool)
    errors = np.zeros((p, g), bool)
    block_lists: dict[tuple[int, int], tuple] = {}
    # Score per task so each verifier sees a batch (its worker pool amortises start-up).
    by_task: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_task.setdefault(it.task, []).append(i)
    for name, rows in by_task.items():
        recs = [items[i].record for i in rows for _ in range(g)]
        comps = [flat_texts[i * g + j] for i in rows for j in range(g)]
        scores = score_fn(tasks[name], recs, comps)
        for k, s in enumerate(scores):
            i, j = rows[k // g], k % g
            rewards[i, j] = s.reward if np.isfinite(s.reward) else 0.0
            correct[i, j] = bool(s.correct)
            errors[i, j] = s.error is not None
            block_lists[i, j] = tuple(s.blocks) if s.error is None else ()
    num_blocks = max((len(b) for b in block_lists.values()), default=0)
    blocks = np.zeros((p, g, num_blocks), np.float32)
    for (i, j), b in block_lists.items():
        if len(b) == num_blocks:
            blocks[i, j] = b
    truncated = np.asarray(out.truncated).astype(bool)
    block_ids = np.full(tokens.shape, -1, np.int32)
    if with_blocks:
        for name, rows in by_task.items():
            sel = np.asarray(rows)
            ids = rollout_block_ids(
                tasks[name], tokenizer, tokens[sel].reshape(len(rows) * g, -1),
                cmask[sel].reshape(len(rows) * g, -1),
                [flat_texts[i * g + j] for i in rows for j in range(g)],
                truncated[sel].reshape(-1), eos_ids,
            )
            block_ids[sel] = ids.reshape(len(rows), g, -1)
    return Groups(
        task_ids=np.asarray([task_index[it.task] for it in items], np.int32),
        items=list(items),
        prompt_tokens=ptoks,
        prompt_mask=pmask,
        tokens=tokens,
        mask=cmask,
        logprobs=np.asarray(out.logprobs, np.float32),
        truncated=truncated,
        rewards=rewards,
        correct=correct,
        errors=errors,
        texts=[flat_texts[i * g : (i + 1) * g] for i in range(p)],
        blocks=blocks,
        block_ids=block_ids,
    )


def generate_chunked(generate: Callable, prompt_tokens, prompt_mask, key: jax.Array,
                     max_prompts: int | None):
    """``generate`` over the prompts in consecutive chunks of at most ``max_prompts`` rows.

    Bounds the sampler's KV cache (it holds ``chunk * G`` rows instead of ``P * G``). Chunk ``c``
    samples with ``fold_in(key, c)``; with one chunk (``max_prompts`` None or >= P) this is
    exactly ``generate(prompt_tokens, prompt_mask, key)``. Returns the host (NumPy) rollout with
    its ``[P, ...]`` fields concatenated in prompt order.
    """
    p = prompt_tokens.shape[0]
    if max_prompts is None or max_prompts >= p:
        return jax.device_get(generate(prompt_tokens, prompt_mask, key))
    if isinstance(max_prompts, bool) or not isinstance(max_prompts, int) or max_prompts < 1:
        raise ValueError(f"max_prompts must be a positive int or None, got {max_prompts!r}")
    parts = [jax.device_get(generate(prompt_tokens[s:s + max_prompts],
                                     prompt_mask[s:s + max_prompts], jax.random.fold_in(key, c)))
             for c, s in enumerate(range(0, p, max_prompts))]
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *parts)


def overlong_penalty(lengths: np.ndarray, max_len: int, buffer: int, factor: float = 1.0):
    """DAPO's soft overlong punishment, counted in tokens.

    0 up to ``max_len - buffer`` tokens, then falling linearly to ``-factor`` at ``max_len``
    (and ``-factor`` beyond, i.e. truncated completions).
    """
    if buffer <= 0:
        return np.where(lengths > max_len, -factor, 0.0).astype(np.float32)
    start = max_len - buffer
    pen = np.clip((start - lengths) / buffer, -1.0, 0.0) * factor
    return pen.astype(np.float32)


class GroupStream:
    """Finished groups, one prompt at a time, for ``RatioPreservingSampler.run_step_streamed``.

    ``submit(requests)`` draws that many prompts per task with ``draw`` and feeds them to a
    paged-engine ``session`` (:class:`jaxgrpo.rollout.engine.PagedSession`) while it decodes;
    ``finished()`` runs the session until some prompts have all their samples, scores them as
    :func:`collect` does, and returns them as ``data.Group`` s whose payload ``(part, row)``
    indexes :attr:`parts`; ``cancel()`` drops whatever is still in flight. Each prompt's
    completions depend on the session's key and the prompt's position in the step's draw order
    only (its uid), not on what else is in flight.
    """

    def __init__(self, session, *, draw: Callable, tasks: dict, task_index: dict[str, int],
                 tokenizer, prompt_buckets: Sequence[int], pad_id: int, score_fn: Callable,
                 with_blocks: bool = False, eos_ids: Sequence[int] = (),
                 postprocess: Callable | None = None):
        self.session, self._draw, self._tasks = session, draw, tasks
        self._kw = dict(tasks=tasks, task_index=task_index, tokenizer=tokenizer,
                        prompt_buckets=prompt_buckets, pad_id=pad_id, score_fn=score_fn,
                        with_blocks=with_blocks, eos_ids=eos_ids)
        self._postprocess = postprocess
        self._waiting: dict[int, object] = {}  # uid -> task-sampler item
        self._next_uid = 0
        self.parts: list[Groups] = []  # every scored batch of finished prompts, in order

    def submit(self, requests: dict[str, int]) -> None:
        items = self._draw(requests)
        if not items:
            return
        texts = [self._tasks[it.task].prompt(it.record) for it in items]
        ptoks, pmask = hostio.encode_prompts(self._kw["tokenizer"], texts,
                                             self._kw["prompt_buckets"], self._kw["pad_id"])
        uids = list(range(self._next_uid, self._next_uid + len(items)))
        self._next_uid += len(items)
        self._waiting.update(zip(uids, items, strict=True))
        self.session.submit(ptoks, pmask, uids)

    def finished(self) -> list[Group]:
        done = self.session.run()
        if not done:
            return []
        items = [self._waiting.pop(f.uid) for f in done]
        rollout = Rollout(*(np.stack([getattr(f, name) for f in done]) for name in (
            "tokens", "logprobs", "mask", "lengths", "truncated")))
        g = collect(items, generate=lambda *_: rollout, key=None, **self._kw)
        if self._postprocess is not None:
            self._postprocess(g)
        r = len(self.parts)
        self.parts.append(g)
        return [Group(it.task, it.uid, tuple(g.rewards[i]), (r, i)) for i, it in enumerate(items)]

    def cancel(self) -> int:
        dropped = self.session.cancel()
        for uid in dropped:
            self._waiting.pop(uid, None)
        return len(dropped)
