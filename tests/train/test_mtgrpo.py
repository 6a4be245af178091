"""TaskWeightUpdater against a NumPy transcription of the released MT-GRPO code's weight update.

The transcription (plain loops, float64) follows the authors' released code for arXiv
2602.05547: logits ``w = 0``; torch ``Adam([w], lr, weight_decay=gamma)`` (coupled L2, betas
(0.9, 0.999), eps 1e-8); the accuracy EMA (decay 0.5, from 0) takes one step per generation
round for the tasks generated in it, from the mean over the task's prompts of the fraction of
correct rollouts; after the policy update, one Adam step per minibatch on the autograd gradient
of ``<softmax(w), s>`` with ``s_k = clip(I_k, -c, c) + lam * J_k``.
"""

import math

import numpy as np
import pytest

from jaxgrpo.config import MTGRPOConfig
from jaxgrpo.train.mtgrpo import TaskWeightUpdater


class ReleasedRule:
    """The released code's per-round J and per-minibatch Adam step, transcribed with loops."""

    def __init__(self, k, *, lam, lr, gamma, clip, acc_decay=0.5, b1=0.9, b2=0.999, eps=1e-8):
        self.k, self.lam, self.lr, self.gamma, self.clip = k, lam, lr, gamma, clip
        self.acc_decay, self.b1, self.b2, self.eps = acc_decay, b1, b2, eps
        self.w, self.m, self.v = [0.0] * k, [0.0] * k, [0.0] * k
        self.t = 0
        self.acc = [0.0] * k

    def round(self, correct, task_ids):
        total, count = [0.0] * self.k, [0] * self.k
        for row, task in zip(correct, task_ids, strict=True):
            total[task] += sum(bool(c) for c in row) / len(row)
            count[task] += 1
        for task in range(self.k):
            if count[task]:
                cur = total[task] / count[task]
                self.acc[task] = self.acc_decay * self.acc[task] + (1 - self.acc_decay) * cur

    def z(self):
        top = max(self.w)
        e = [math.exp(x - top) for x in self.w]
        return [x / sum(e) for x in e]

    def minibatch(self, improvement):
        z = self.z()
        s = [min(max(improvement[i], -self.clip), self.clip) + self.lam * self.acc[i]
             for i in range(self.k)]
        avg = sum(z[j] * s[j] for j in range(self.k))
        self.t += 1
        for i in range(self.k):
            g = z[i] * (s[i] - avg) + self.gamma * self.w[i]
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            mhat = self.m[i] / (1 - self.b1**self.t)
            vhat = self.v[i] / (1 - self.b2**self.t)
            self.w[i] -= self.lr * mhat / (math.sqrt(vhat) + self.eps)


def _trajectory(rng, k, steps, *, rates, max_rounds, minibatches, prompts=24, group=8,
                scale=0.15):
    """Per step: 1..max_rounds rounds of groups (some tasks absent from some rounds) and an
    ``[M, K]`` improvement that often exceeds the clip."""
    out = []
    for _ in range(steps):
        rounds = []
        for _ in range(int(rng.integers(1, max_rounds + 1))):
            present = rng.permutation(k)[: int(rng.integers(1, k + 1))]
            ids = rng.choice(present, size=prompts)
            correct = rng.random((prompts, group)) < np.asarray(rates)[ids, None]
            rounds.append((correct, ids.astype(np.int32)))
        out.append((rounds, rng.normal(scale=scale, size=(minibatches, k))))
    return out


@pytest.mark.parametrize("k,lam,gamma,clip,max_rounds", [
    (3, 0.2, 1e-5, 0.1, 4),  # the 3-task setting, up to 4 rounds per step
    (9, 1.2, 1e-4, 0.2, 2),  # the 9-task setting, at most one resample
])
def test_weights_follow_the_released_per_round_rule_over_200_steps(k, lam, gamma, clip,
                                                                   max_rounds):
    rng = np.random.default_rng(k)
    rates = rng.uniform(0.05, 0.95, size=k)
    cfg = MTGRPOConfig(lam=lam, weight_decay=gamma, improvement_clip=clip)
    names = [f"t{i}" for i in range(k)]
    mine = TaskWeightUpdater(names, cfg)
    ref = ReleasedRule(k, lam=lam, lr=cfg.weight_lr, gamma=gamma, clip=clip)
    worst = 0.0
    for rounds, imp in _trajectory(rng, k, 200, rates=rates, max_rounds=max_rounds,
                                   minibatches=4):
        for correct, ids in rounds:
            ref.round(correct.tolist(), ids.tolist())
        for row in imp.tolist():
            ref.minibatch(row)
        mine.update(rounds, imp.astype(np.float32))
        z = np.array(list(mine.weights().values()))
        worst = max(worst, float(np.max(np.abs(z - np.array(ref.z())))))
        np.testing.assert_allclose(np.asarray(mine.acc), ref.acc, rtol=0, atol=1e-6)
    assert worst < 1e-5, worst
    assert max(ref.z()) - min(ref.z()) > 1e-2  # the weights did move


def test_pooling_the_rounds_is_not_the_released_rule():
    """One EMA step over all of a step's rounds pooled drifts from the per-round rule."""
    rng = np.random.default_rng(0)
    cfg = MTGRPOConfig()
    per_round = TaskWeightUpdater(["a", "b", "c"], cfg)
    pooled = TaskWeightUpdater(["a", "b", "c"], cfg)
    for rounds, imp in _trajectory(rng, 3, 20, rates=[0.2, 0.5, 0.8], max_rounds=3,
                                   minibatches=4):
        per_round.update(rounds, imp)
        pooled.update([(np.concatenate([c for c, _ in rounds]),
                        np.concatenate([i for _, i in rounds]))], imp)
    assert np.max(np.abs(np.asarray(per_round.acc) - np.asarray(pooled.acc))) > 1e-3


def test_per_step_update_clips_the_summed_minibatches_once():
    cfg = MTGRPOConfig(update="per_step", lam=0.5, improvement_clip=0.1)
    mine = TaskWeightUpdater(["a", "b"], cfg)
    ref = ReleasedRule(2, lam=0.5, lr=cfg.weight_lr, gamma=cfg.weight_decay, clip=0.1)
    rounds = [(np.array([[1, 0], [1, 1]], bool), np.array([0, 1], np.int32))]
    imp = np.array([[0.08, -0.02], [0.07, -0.03]])
    for c, i in rounds:
        ref.round(c.tolist(), i.tolist())
    ref.minibatch(imp.sum(axis=0).tolist())  # one step on clip(0.15) = 0.1 and -0.05
    mine.update(rounds, imp)
    np.testing.assert_allclose(list(mine.weights().values()), ref.z(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(mine.last_improvement, [0.1, -0.05], atol=1e-7)


def test_without_adaptation_j_is_tracked_and_z_stays_uniform():
    mine = TaskWeightUpdater(["a", "b", "c"], MTGRPOConfig(adapt_weights=False))
    rounds = [(np.ones((2, 4), bool), np.array([0, 2], np.int32))]
    mine.update(rounds, np.full((4, 3), 0.05))
    assert list(mine.weights().values()) == [1 / 3] * 3
    np.testing.assert_allclose(np.asarray(mine.acc), [0.5, 0.0, 0.5])


def test_state_round_trip_continues_bitwise():
    rng = np.random.default_rng(3)
    traj = _trajectory(rng, 3, 12, rates=[0.3, 0.5, 0.7], max_rounds=3, minibatches=4)
    full = TaskWeightUpdater(["a", "b", "c"], MTGRPOConfig())
    cut = TaskWeightUpdater(["a", "b", "c"], MTGRPOConfig())
    for rounds, imp in traj[:6]:
        full.update(rounds, imp)
        cut.update(rounds, imp)
    resumed = TaskWeightUpdater(["a", "b", "c"], MTGRPOConfig())
    resumed.set_state(cut.get_state())
    for rounds, imp in traj[6:]:
        full.update(rounds, imp)
        resumed.update(rounds, imp)
    assert full.get_state() == resumed.get_state()
    assert full.weights() == resumed.weights()
