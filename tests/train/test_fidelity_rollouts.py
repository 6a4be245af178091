"""Nested rollouts of the fidelity study: a scripted policy (exact values) and a nano model."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxgrpo.evaluation import fidelity as fid
from jaxgrpo.model import build_demo_tokenizer
from jaxgrpo.rollout.sampler import Rollout
from jaxgrpo.tasks import get_task
from jaxgrpo.train import fidelity
from jaxgrpo.train.policy import special_ids
from tests.train.conftest import tiny_overrides


@dataclasses.dataclass
class ScriptedPolicy:
    """Stage 1: sample g of prompt p answers <a>gold</a> (even g) or a wrong sum (odd g) with
    confidence 0.g, except g == 1, which has no answer. Stage 2 (prompt ends in '</a>'):
    continuation m is '<c>0.m</c>'."""

    tokenizer: object
    pad_id: int
    eos_ids: tuple
    answers: list

    def generator(self, *, num_samples, max_new_tokens, **_):
        tok = self.tokenizer

        def gen(params, prompt_tokens, prompt_mask, key):
            rows = []
            for p in range(prompt_tokens.shape[0]):
                text = tok.decode(np.asarray(prompt_tokens[p])[np.asarray(prompt_mask[p])],
                                  skip_special_tokens=True)
                if text.endswith("</a>"):
                    rows.append([f"<c>0.{m}</c>" for m in range(num_samples)])
                    continue
                gold = dict(self.answers).get(text)
                if gold is None:  # a filler row of the second stage
                    rows.append([""] * num_samples)
                    continue
                rows.append([
                    "x y" if g == 1 else f"<a>{gold if g % 2 == 0 else int(gold) + 1}</a><c>0.{g}</c>"
                    for g in range(num_samples)
                ])
            n_p, tn = len(rows), max_new_tokens
            toks = np.full((n_p, num_samples, tn), self.pad_id, np.int32)
            mask = np.zeros((n_p, num_samples, tn), bool)
            for p, r in enumerate(rows):
                for g, s in enumerate(r):
                    ids = tok(s, add_special_tokens=False)["input_ids"] + [self.eos_ids[0]]
                    toks[p, g, :len(ids)], mask[p, g, :len(ids)] = ids, True
            return Rollout(toks, np.zeros(toks.shape, np.float32), mask, mask.sum(-1),
                           np.zeros(mask.shape[:2], bool))

        return gen


def test_scripted_nested_rollouts_exact(tmp_path):
    tok = build_demo_tokenizer(tmp_path / "tok")
    pad, eos = special_ids(tok)
    task = get_task("confidence", base="addition@1", tags="short")
    ds = task.dataset("eval", 0)
    records = [ds[i] for i in range(3)]
    pol = ScriptedPolicy(tok, pad, eos, [(task.prompt(r), r["answer"]) for r in records])
    g, m = 4, 5
    nr = fidelity.nested_rollouts(pol, None, task, records, group_size=g, num_mc=m,
                                  max_new_tokens=24, key=jax.random.key(0),
                                  prompt_buckets=(16, 32, 64), chunk=2, stream=None)
    assert nr.valid.tolist() == [[True, False, True, True]] * 3
    assert nr.correct.tolist() == [[True, False, True, False]] * 3
    np.testing.assert_allclose(nr.confidence[:, [0, 2, 3]], [[0.0, 0.2, 0.3]] * 3)
    assert np.isnan(nr.confidence[:, 1]).all()
    # the sample's own block-1 reward, and the continuations' rewards -(0.m - c)^2
    np.testing.assert_allclose(nr.rewards, [[-1.0, 0.0, -0.64, -0.09]] * 3)
    qs = np.arange(m) / 10
    for c, j in ((1.0, 0), (1.0, 2), (0.0, 3)):
        np.testing.assert_allclose(nr.mc_rewards[:, j], np.tile(-(qs - c) ** 2, (3, 1)))
    assert np.isnan(nr.mc_rewards[:, 1]).all() and nr.mc_texts[0][1] is None
    for i, r in enumerate(records):
        head = f"<a>{r['answer']}</a>"
        assert nr.mc_texts[i][0] == [head + f"<c>0.{k}</c>" for k in range(m)]
        assert nr.prefix_tokens[i, 0] == len(head)
    t = nr.table()
    ref = fid.fidelity_table(nr.rewards, nr.correct, nr.mc_mean, nr.valid,
                             mc_var=nr.mc_var, num_mc=m)
    assert t == ref
    assert t["correct"]["n"] == 6 and t["incorrect"]["n"] == 3
    # the MC value of a correct prefix is mean(-(q - 1)^2) over q = 0.0..0.4
    np.testing.assert_allclose(nr.mc_mean[0, 0], np.mean(-(qs - 1) ** 2))


def test_bad_arguments(tmp_path):
    tok = build_demo_tokenizer(tmp_path / "tok")
    pad, eos = special_ids(tok)
    task = get_task("confidence", base="addition@1", tags="short")
    pol = ScriptedPolicy(tok, pad, eos, [])
    kw = dict(group_size=2, num_mc=2, max_new_tokens=8, key=jax.random.key(0),
              prompt_buckets=(16,), stream=None)
    with pytest.raises(ValueError, match="num_mc must be >= 2"):
        fidelity.nested_rollouts(pol, None, task, [{}], **{**kw, "num_mc": 1})
    with pytest.raises(ValueError, match="records must hold"):
        fidelity.nested_rollouts(pol, None, task, [], **kw)
    with pytest.raises(ValueError, match="confidence"):
        fidelity.nested_rollouts(pol, None, get_task("addition@1"), [{}], **kw)


def test_cli_on_nano_model(nano_model, tmp_path, capsys):
    from jaxgrpo import cli

    out = tmp_path / "fid.json"
    args = ["fidelity", "configs/bae_cpu_experiment.yaml", "model.preset=tiny",
            *tiny_overrides(tmp_path / "run", **{"rollout.max_new_tokens": 20, "tasks.prompts_per_step": 8,
                                                 "tasks.mixture": None}),
            "--prompts", "2", "--G", "2", "--M", "2", "--out", str(out)]
    assert cli.main(args) == 0
    res = json.loads(out.read_text())
    assert (res["prompts"], res["G"], res["M"]) == (2, 2, 2)
    assert set(res["table"]) == {"correct", "incorrect", "all"}
    assert "| ocb |" in capsys.readouterr().out
    assert cli.main(["fidelity", "configs/bae_cpu_experiment.yaml", "--M", "1"]) == 2
