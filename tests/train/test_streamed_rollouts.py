"""Streamed rollouts: finished groups from a paged-engine session feed the batch sampler."""

import io
import json

import numpy as np
import pytest

from jaxgrpo.config import ConfigError, load_config
from jaxgrpo.data import TaskSampler
from jaxgrpo.model import load_tokenizer
from jaxgrpo.model.tokenizer import SHIPPED_DEMO_TOKENIZER
from jaxgrpo.rollout import Rollout
from jaxgrpo.rollout.engine import FinishedPrompt
from jaxgrpo.tasks import get_task, score_many
from jaxgrpo.train import loop
from jaxgrpo.train.rollouts import GroupStream, collect
from tests.train.conftest import tiny_overrides

G, TN = 3, 6


def test_config_needs_the_paged_engine(tmp_path):
    with pytest.raises(ConfigError, match="algo.sampling.stream.*rollout.engine=paged"):
        load_config(None, tiny_overrides(tmp_path, **{"algo.sampling.stream": True}))
    with pytest.raises(ConfigError, match="algo.sampling.stream"):
        load_config(None, tiny_overrides(tmp_path, **{"algo.sampling.stream": 1,
                                                       "rollout.engine": "paged"}))
    cfg = load_config(None, tiny_overrides(tmp_path, **{"algo.sampling.stream": True,
                                                         "rollout.engine": "paged"}))
    assert cfg.algo.sampling.stream


class _FakeSession:
    """Finishes the submitted prompts two per run(), in reverse uid order; each completion's
    tokens are a function of (uid, sample) only."""

    def __init__(self, vocab):
        self.vocab, self.queue, self.submitted, self.cancelled = vocab, [], [], []

    def completion(self, uid):
        rng = np.random.default_rng(uid)
        lengths = rng.integers(1, TN + 1, G).astype(np.int32)
        mask = np.arange(TN)[None] < lengths[:, None]
        tokens = np.where(mask, rng.integers(4, self.vocab, (G, TN)), 0).astype(np.int32)
        return FinishedPrompt(uid, tokens, np.where(mask, -0.5, 0.0).astype(np.float32), mask,
                         lengths, lengths == TN)

    def submit(self, tokens, mask, uids):
        assert tokens.shape == mask.shape and tokens.shape[0] == len(uids)
        self.submitted.append(list(uids))
        self.queue.extend(uids)

    def run(self):
        self.queue.sort()
        done, self.queue = self.queue[-2:][::-1], self.queue[:-2]
        return [self.completion(u) for u in done]

    def cancel(self):
        out, self.queue = list(self.queue), []
        self.cancelled.extend(out)
        return out


def test_group_stream_scores_each_finished_prompt_as_collect_does():
    tokenizer = load_tokenizer(SHIPPED_DEMO_TOKENIZER)
    names = ["reverse@1", "countdown@1"]
    tasks = {n: get_task(n) for n in names}
    prompts = TaskSampler({n: t.dataset("train", 0) for n, t in tasks.items()}, [0.5, 0.5],
                          global_batch=4, seed=0)
    reference = TaskSampler({n: t.dataset("train", 0) for n, t in tasks.items()}, [0.5, 0.5],
                            global_batch=4, seed=0)
    session = _FakeSession(len(tokenizer))
    kw = dict(tasks=tasks, task_index={n: i for i, n in enumerate(names)}, tokenizer=tokenizer,
              prompt_buckets=(24, 32), pad_id=0, score_fn=score_many)
    stream = GroupStream(session, draw=prompts.draw, **kw)
    stream.submit({"reverse@1": 2, "countdown@1": 1})
    stream.submit({"reverse@1": 1, "countdown@1": 2})
    assert session.submitted == [[0, 1, 2], [3, 4, 5]]
    items = reference.draw({"reverse@1": 2, "countdown@1": 1}) + reference.draw(
        {"reverse@1": 1, "countdown@1": 2})
    got = stream.finished() + stream.finished()
    assert [g.uid for g in got] == [items[u].uid for u in (5, 4, 3, 2)]
    assert stream.cancel() == 2 and session.cancelled == [0, 1]
    for g in got:
        u = next(i for i, it in enumerate(items) if it.uid == g.uid)
        f = session.completion(u)
        ro = Rollout(f.tokens[None], f.logprobs[None], f.mask[None], f.lengths[None],
                     f.truncated[None])
        want = collect([items[u]], generate=lambda *_, r=ro: r, key=None, **kw)
        part, row = g.payload
        have = stream.parts[part].take([row])
        assert g.task == items[u].task
        np.testing.assert_array_equal(have.rewards, want.rewards)
        np.testing.assert_array_equal(np.asarray(g.rewards), want.rewards[0])
        np.testing.assert_array_equal(have.tokens, want.tokens)
        np.testing.assert_array_equal(have.logprobs, want.logprobs)
        assert have.task_ids.tolist() == want.task_ids.tolist()
    assert stream.finished() == []


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "filt"), [("dapo", "lenient"), ("mt_grpo", "none")])
def test_streamed_training_keeps_the_exact_batch(tmp_path, nano_model, algo, filt):
    extra = {"algo.name": algo, "rollout.engine": "paged", "algo.sampling.stream": True,
             "algo.sampling.filter": filt, "train.steps": 3, "checkpoint.every": 0,
             "rollout.max_slots": 16}
    if algo == "dapo":
        extra["algo.sampling.enabled"] = True
    cfg = load_config(None, tiny_overrides(tmp_path, **extra))
    loop.run(cfg, stream=io.StringIO())
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in rows if "rps/rounds" in r]
    assert len(steps) == 3
    b = cfg.tasks.prompts_per_step
    for r in steps:
        assert r["rps/generated"] >= b and "rps/dropped" in r
        counts = {k: v for k, v in r.items() if k.endswith("/realised_count")}
        targets = {k.replace("target", "realised"): v for k, v in r.items()
                   if k.endswith("/target_count")}
        if filt == "none":  # every group is accepted: one submit of exactly the targets
            assert not r["rps/hit_cap"] and r["rps/rounds"] == 1 and r["rps/dropped"] == 0
            assert counts == targets and sum(counts.values()) == b
        elif not r["rps/hit_cap"]:
            assert sum(counts.values()) == b
        else:  # the untrained policy's groups are mostly all-wrong: padded to B
            assert r["rps/generated"] == cfg.algo.sampling.max_rounds * 3 * b
