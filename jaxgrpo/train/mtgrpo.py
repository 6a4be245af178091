"""MT-GRPO's task weights on the host side of the loop: J_k, the IWU steps, and their state.

Per training step, as the released code of arXiv 2602.05547 does it: J_k, an EMA of each
task's rollout accuracy before filtering (correctness only, no format credit), takes one EMA
step per *generation round*, for the tasks generated in that round; the train step reports, per
minibatch update, the per-task change of the clipped surrogate I_k (``StepConfig.num_tasks``,
summed or averaged over the task's trained sequences of the minibatch); the task logits xi then
take one IWU step per minibatch (the released code) or one per step (the paper, with the
minibatches' changes added up), and z = softmax(xi) sets the next step's batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrpo.config import MTGRPOConfig, WeightUpdate
from jaxgrpo.core import weighting
from jaxgrpo.train import task_weights


class TaskWeightUpdater:
    """Holds xi, the optimiser state and J; ``weights()`` gives z as ``{task: weight}``.

    With ``cfg.adapt_weights`` false, xi never moves (z stays uniform): the paper's GRPO+RPS
    ablation, the ratio-preserving sampler without IWU.
    """

    def __init__(self, names: list[str], cfg: MTGRPOConfig):
        self.names, self.cfg = list(names), cfg
        self.tx = task_weights.make_task_weight_optimizer(
            str(cfg.weight_optimizer), lr=cfg.weight_lr, weight_decay=cfg.weight_decay
        )
        self.logits, self.opt_state = task_weights.init_task_weights(len(names), self.tx)
        k, decay = len(names), cfg.acc_ema

        def round_ema(acc, correct, task_ids):
            frac, present = weighting.task_accuracy(correct, task_ids, k)
            return weighting.ema_update(acc, frac, present, decay=decay)

        self._round_ema = jax.jit(round_ema)  # compiled once per round shape
        self._iwu_steps = jax.jit(functools.partial(
            task_weights.iwu_minibatch_steps, tx=self.tx, lam=cfg.lam))
        self.acc = jnp.zeros((len(names),), jnp.float32)
        self.last_improvement = np.zeros(len(names))  # I_k of the last step (clipped, summed)

    def weights(self) -> dict[str, float]:
        z = np.asarray(jax.nn.softmax(self.logits), np.float64)
        z = z / z.sum()
        return dict(zip(self.names, z.tolist(), strict=True))

    def update(self, rounds, improvement_MxK) -> None:
        """One training step's update.

        Args:
          rounds: the step's generation rounds in order, each ``(correct [P, G], task_ids [P])``
            over every generated group (before filtering). J_k takes one EMA step per round for
            the tasks present in it (the released code's ``update_batch_acc``).
          improvement_MxK: ``[M, K]`` I_k of each minibatch update, reduced over the task's
            trained sequences by the train step (``StepConfig.improvement_reduce``), unclipped.
        """
        for correct, task_ids in rounds:
            self.acc = self._round_ema(self.acc, np.asarray(correct, np.float32),
                                       np.asarray(task_ids, np.int32))
        if not self.cfg.adapt_weights:  # GRPO+RPS: J_k is still tracked, z stays uniform
            return
        imp = jnp.asarray(improvement_MxK, jnp.float32)
        c = self.cfg.improvement_clip
        if self.cfg.update == WeightUpdate.PER_STEP:
            imp = jnp.clip(imp.sum(axis=0, keepdims=True), -c, c)
        else:
            imp = jnp.clip(imp, -c, c)
        self.last_improvement = np.asarray(imp, np.float64).sum(axis=0)
        self.logits, self.opt_state, _ = self._iwu_steps(self.logits, self.opt_state, self.acc, imp)

    def metrics(self) -> dict[str, float]:
        """J_k after this step's update and the step's I_k, clipped as used, summed over the
        minibatch updates (z itself is logged by the batch sampler)."""
        out = {f"task/{n}/acc_ema": float(a) for n, a in zip(self.names, self.acc, strict=True)}
        out.update({f"task/{n}/improvement": float(i)
                    for n, i in zip(self.names, self.last_improvement, strict=True)})
        return out

    def get_state(self) -> dict:
        leaves = jax.tree.leaves(self.opt_state)
        return {
            "logits": np.asarray(self.logits).tolist(),
            "acc": np.asarray(self.acc).tolist(),
            "opt_state": [np.asarray(x).tolist() for x in leaves],
        }

    def set_state(self, state: dict) -> None:
        self.logits = jnp.asarray(state["logits"], jnp.float32)
        self.acc = jnp.asarray(state["acc"], jnp.float32)
        treedef = jax.tree.structure(self.opt_state)
        old = jax.tree.leaves(self.opt_state)
        new = [jnp.asarray(v, dtype=o.dtype) for v, o in zip(state["opt_state"], old, strict=True)]
        self.opt_state = jax.tree.unflatten(treedef, new)
