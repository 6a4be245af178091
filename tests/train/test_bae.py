"""BAE in the trainer: token block ids of sampled completions, blockwise advantages on tokens,
no cross-block gradient (per token and through the train step), the adaptive entropy coefficient,
and short end-to-end runs of the BAE and RLCR configurations."""

import io
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxgrpo.config import load_config
from jaxgrpo.core import losses
from jaxgrpo.model import build_demo_tokenizer
from jaxgrpo.tasks import Score, get_task
from jaxgrpo.train import batch as batch_lib
from jaxgrpo.train import blocks, loop
from jaxgrpo.train.state import init_train_state, split_model
from jaxgrpo.train.step import StepConfig, make_train_step
from tests.train.conftest import tiny_overrides
from tests.train.test_step import Toy

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLD = "<reasoning>x</reasoning><answer>7</answer><analysis>ok</analysis><confidence>0.8</confidence>"


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


# ---- token offsets and block ids -----------------------------------------------------------


def test_token_offsets_are_character_spans_and_special_tokens_are_zero_width(tok):
    ids = tok(GOLD, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    text = tok.decode(ids, skip_special_tokens=True)
    off = blocks.token_offsets(tok, ids, text)
    assert off[:-1] == [(i, i + 1) for i in range(len(GOLD))]
    assert off[-1] == (len(GOLD), len(GOLD))


class _PieceTokenizer:
    """A stand-in whose re-tokenisation differs from the sampled ids (forces paths 2 and 3).

    With ``merge``, decoding several ids merges "bc" into "X" (as a byte-level decoder merges
    bytes into one character), so the single-token pieces no longer concatenate to the text.
    """

    all_special_ids = [0]
    pieces = {0: "", 1: "ab", 2: "c", 3: "de"}

    def __init__(self, merge=False):
        self.merge = merge

    def __call__(self, text, **kw):
        return {"input_ids": [99], "offset_mapping": [(0, len(text))]}

    def decode(self, ids, skip_special_tokens=True):
        s = "".join(self.pieces[i] for i in ids)
        return s.replace("bc", "X") if self.merge and len(ids) > 1 else s


def test_token_offsets_fall_back_to_pieces_then_prefix_decoding():
    t = _PieceTokenizer()
    assert blocks.token_offsets(t, [1, 2, 0, 3], "abcde") == [(0, 2), (2, 3), (3, 3), (3, 5)]
    # Pieces do not concatenate to the text: exact prefix decoding, spans never go backwards.
    off = blocks.token_offsets(_PieceTokenizer(merge=True), [1, 2, 3], "aXde")
    assert off == [(0, 2), (2, 2), (2, 4)]


def test_rollout_block_ids_split_at_analysis_and_give_eos_to_the_last_block(tok):
    task = get_task("confidence", base="addition@1")
    ids = tok(GOLD, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    tc = len(ids) + 3
    tokens = np.zeros((2, tc), np.int32)
    mask = np.zeros((2, tc), bool)
    tokens[0, : len(ids)], mask[0, : len(ids)] = ids, True
    cut = GOLD[:30]  # truncated inside the solution block: no confidence block
    cut_ids = tok(cut, add_special_tokens=False)["input_ids"]
    tokens[1, : len(cut_ids)], mask[1, : len(cut_ids)] = cut_ids, True
    texts = [GOLD, cut]
    out = blocks.rollout_block_ids(task, tok, tokens, mask, texts, np.array([False, True]),
                                   [tok.eos_token_id])
    split = GOLD.index("<analysis>")
    want0 = np.full(tc, -1)
    want0[:split], want0[split : len(ids)] = 0, 1  # EOS (last real position) joins block 1
    np.testing.assert_array_equal(out[0], want0)
    want1 = np.full(tc, -1)
    want1[: len(cut_ids)] = 0
    np.testing.assert_array_equal(out[1], want1)
    with pytest.raises(TypeError, match="structured task"):
        blocks.rollout_block_ids(get_task("addition@1"), tok, tokens, mask, texts,
                                 np.array([False, True]), [tok.eos_token_id])


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE (GPT-2 / Qwen style) trained in memory on structured completions."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    core = tokenizers.Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([GOLD, GOLD.replace("0.8", "0.25").replace("7", "12")] * 20, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


@pytest.mark.parametrize("canonical", [True, False])
def test_block_ids_with_a_byte_level_bpe_follow_the_text(bpe, canonical):
    """Sampled ids need not be the tokenizer's own segmentation: a character-by-character
    sequence decodes to the same text and must get the same block per character."""
    task = get_task("confidence", base="addition@1")
    if canonical:
        ids = bpe(GOLD, add_special_tokens=False)["input_ids"]
        assert len(ids) < len(GOLD) // 2  # merges happened
    else:
        ids = [bpe.convert_tokens_to_ids(bpe.tokenize(ch))[0] for ch in GOLD]
    ids = ids + [bpe.eos_token_id]
    text = bpe.decode(ids, skip_special_tokens=True)
    assert text == GOLD
    off = blocks.token_offsets(bpe, ids, text)
    assert off[0][0] == 0 and off[-2][1] == len(GOLD) and off[-1] == (len(GOLD), len(GOLD))
    assert all(a[1] == b[0] for a, b in zip(off, off[1:], strict=False))  # contiguous
    assert "".join(text[s:e] for s, e in off) == text
    tokens = np.asarray([ids], np.int32)
    out = blocks.rollout_block_ids(task, bpe, tokens, np.ones_like(tokens, bool), [text],
                                   np.array([False]), [bpe.eos_token_id])[0]
    split = GOLD.index("<analysis>")
    want = [0 if s < split else 1 for s, e in off[:-1]] + [1]
    np.testing.assert_array_equal(out, want)


# ---- advantages on tokens ------------------------------------------------------------------


def _layout(lengths0, lengths1, tc):
    """Block ids [N, tc]: block 0 then block 1 then padding."""
    ids = np.full((len(lengths0), tc), -1, np.int32)
    for i, (a, b) in enumerate(zip(lengths0, lengths1, strict=True)):
        ids[i, :a], ids[i, a : a + b] = 0, 1
    return ids


def test_blockwise_token_advantages_match_the_spec_example():
    # A worked example: c = [1,1,0,0], q = [0.9,0.6,0.2,0.7], Brier confidence reward.
    c = np.array([[1, 1, 0, 0]], bool)
    q = np.array([0.9, 0.6, 0.2, 0.7])
    r = np.stack([c[0].astype(float), -((q - c[0]) ** 2)], -1)[None].astype(np.float32)
    ids = _layout([3, 5, 2, 4], [2, 1, 3, 2], 8)[None]
    adv, tok_adv, w = blocks.blockwise_token_advantages(
        r, c, np.ones((1, 4), bool), ids, baselines=("group_mean", "ocb"))
    np.testing.assert_allclose(adv[0, :, 0], [0.5, 0.5, -0.5, -0.5], atol=1e-6)
    np.testing.assert_allclose(adv[0, :, 1], [0.075, -0.075, 0.225, -0.225], atol=1e-6)
    for g in range(4):
        for t in range(8):
            k = ids[0, g, t]
            want_a = 0.0 if k < 0 else adv[0, g, k]
            want_w = 0.0 if k < 0 else 1.0 / np.sum(ids[0, g] == k)
            assert tok_adv[0, g, t] == pytest.approx(want_a, abs=1e-7)
            assert w[0, g, t] == pytest.approx(want_w, rel=1e-6)
    with pytest.raises(ValueError, match="block_baselines has 1 entries"):
        blocks.blockwise_token_advantages(r, c, np.ones((1, 4), bool), ids, baselines=("ocb",))


def test_block_outcomes_stratify_later_blocks_by_first_block_correctness():
    c = np.array([[True, False, True]])
    out = blocks.block_outcomes(c, 3)
    np.testing.assert_array_equal(out[0, :, 0], 0)
    np.testing.assert_array_equal(out[0, :, 1], [1, 0, 1])
    np.testing.assert_array_equal(out[0, :, 2], [1, 0, 1])


# ---- no gradient across blocks -------------------------------------------------------------


def test_per_token_gradient_of_block_k_advantage_is_zero_outside_block_k():
    rng = np.random.default_rng(0)
    n, t = 6, 10
    ids = _layout(rng.integers(1, 5, n), rng.integers(1, 4, n), t)
    mask = ids >= 0
    w = np.asarray(blocks.core_adv.block_token_weights(jnp.asarray(ids), 2))
    logp = jnp.asarray(rng.normal(size=(n, t)) * 0.1 - 1.0, jnp.float32)
    old = logp + jnp.asarray(rng.normal(size=(n, t)) * 0.05, jnp.float32)
    for k in (0, 1):
        per_block = np.zeros((n, 2), np.float32)
        per_block[:, k] = rng.normal(size=n)
        a_tok = blocks.core_adv.token_advantages(jnp.asarray(per_block), jnp.asarray(ids))

        def f(lp, a_tok=a_tok):
            return losses.policy_loss(lp, old, a_tok, mask, agg="block_mean",
                                      token_weights=w)[0]

        grad = np.asarray(jax.jit(jax.grad(f))(logp))
        inside = ids == k
        assert np.all(grad[~inside] == 0.0)
        # Inside block k every token whose ratio is unclipped moves, with weight 1/|T_k|.
        ratio = np.exp(np.asarray(logp - old))
        unclipped = inside & (np.abs(ratio - 1) < 0.2)
        assert np.all(grad[unclipped] != 0.0)
        # Contrast: RLCR's one sequence advantage reaches every token of the completion.
        seq = jnp.asarray(per_block[:, k])
        g_seq = jax.grad(lambda lp, seq=seq: losses.policy_loss(lp, old, seq, mask)[0])(logp)
        assert np.all(np.asarray(g_seq)[mask & (np.abs(ratio - 1) < 0.2)] != 0.0)


def _toy_batch(adv_tok, ids, loss_keep=None, seed=0, p=2, g=3, tp=3):
    rng = np.random.default_rng(seed)
    tc = ids.shape[-1]
    ptok = rng.integers(1, 11, (p, tp)).astype(np.int32)
    ctok = rng.integers(1, 11, (p, g, tc)).astype(np.int32)
    cmask = ids >= 0
    w = np.asarray(blocks.core_adv.block_token_weights(jnp.asarray(ids.reshape(p * g, tc)), 2))
    b = batch_lib.assemble(ptok, np.ones((p, tp), bool), ctok, cmask, adv_tok,
                           token_weights=w.reshape(p, g, tc))
    if loss_keep is not None:
        keep = np.zeros(b.loss_mask.shape, bool)
        keep[:, tp - 1 :] = loss_keep.reshape(p * g, tc)
        b = batch_lib.TrainBatch(**{**b.__dict__, "loss_mask": b.loss_mask & keep})
    return b


def test_train_step_update_from_block_k_advantage_ignores_other_blocks_tokens():
    """End to end through the jitted step (toy model, SGD): with only block 1's advantage
    non-zero, the update equals the update of a batch whose block-0 tokens are dropped from the
    loss entirely; applying the same advantage to every token changes the update."""
    p, g, tc = 2, 3, 7
    ids = _layout([3, 2, 4, 1, 3, 2], [2, 3, 1, 4, 2, 3], tc).reshape(p, g, tc)
    rng = np.random.default_rng(1)
    r = np.stack([rng.integers(0, 2, (p, g)), -rng.random((p, g))], -1).astype(np.float32)
    correct = r[..., 0] > 0
    per_block, tok_adv, _ = blocks.blockwise_token_advantages(
        r, correct, np.ones((p, g), bool), ids, baselines=("group_mean", "ocb"))
    only1 = np.where(ids == 1, tok_adv, 0.0).astype(np.float32)
    assert np.any(only1 != 0)

    cfg = StepConfig(agg="block_mean", shuffle=False)
    parts, params = split_model(Toy(nnx.Rngs(0)))
    tx = optax.sgd(1.0)
    step = make_train_step(parts, tx, cfg)

    def delta(batch):
        state = init_train_state(jax.tree.map(jnp.copy, params), tx, 0, with_ref=False)
        new, _ = step(state, batch)
        return [np.asarray(a) - np.asarray(b) for a, b in
                zip(jax.tree.leaves(new.params), jax.tree.leaves(params), strict=True)]

    d_block = delta(_toy_batch(only1, ids))
    d_dropped = delta(_toy_batch(only1, ids, loss_keep=ids == 1))
    for a, b in zip(d_block, d_dropped, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert max(np.abs(a).max() for a in d_block) > 0
    # Block 1's advantage on all tokens (what a scalar advantage would do) is a different update.
    smeared = np.where(ids >= 0, per_block[..., 1:2], 0.0).astype(np.float32)
    d_smeared = delta(_toy_batch(smeared, ids))
    assert max(np.abs(a - b).max() for a, b in zip(d_block, d_smeared, strict=True)) > 1e-4


# ---- adaptive entropy coefficient ----------------------------------------------------------


def test_entropy_controller_steps_toward_target_within_bounds():
    ctl = blocks.EntropyController(target=0.2, delta=5e-4, max_coef=1e-3)
    c = 0.0
    seq = []
    for e in (0.1, 0.1, 0.1, 0.3, 0.3, 0.3, float("nan")):
        c = ctl.update(c, e)
        seq.append(c)
    np.testing.assert_allclose(seq, [5e-4, 1e-3, 1e-3, 5e-4, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="delta"):
        blocks.EntropyController(target=0.2, delta=-1.0, max_coef=1e-3)


# ---- configuration checks and end-to-end runs ----------------------------------------------

BAE = {"tasks.mixture": "[{name: confidence, options: {base: addition@1}}]",
       "loss.estimator": "blockwise", "loss.agg": "block_mean",
       "rollout.max_new_tokens": 12, "rollout.group_size": 4,
       "rollout.prompt_buckets": "[32, 48]"}


def _scripted_score_many(rng):
    """Real parsing for block ids, but a scripted verifier so that groups carry signal."""

    def score(task, records, completions, **kw):
        out = []
        for _ in completions:
            c, q = bool(rng.random() < 0.5), float(rng.random())
            out.append(Score(c - (q - c) ** 2, c, True, None, (float(c), -(q - c) ** 2), q))
        return out

    return score


def test_blockwise_needs_block_mean_and_structured_tasks(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, **{**BAE, "loss.agg": "token_mean"}))
    with pytest.raises(ValueError, match="needs loss.agg 'block_mean'"):
        loop.run(cfg, stream=io.StringIO())
    cfg = load_config(None, tiny_overrides(tmp_path, **{**BAE, "tasks.mixture": "demo"}))
    with pytest.raises(ValueError, match="needs structured tasks"):
        loop.check_blockwise(cfg, {"addition@1": get_task("addition@1")})
    cfg = load_config(None, tiny_overrides(tmp_path, **{"loss.agg": "block_mean"}))
    with pytest.raises(ValueError, match="needs loss.estimator 'blockwise'"):
        loop.check_blockwise(cfg, {})
    cfg = load_config(None, tiny_overrides(tmp_path, **{**BAE, "loss.block_baselines": "[ocb]"}))
    with pytest.raises(ValueError, match="has 2 blocks"):
        loop.check_blockwise(cfg, {"c": get_task("confidence", base="addition@1")})
    cfg = load_config(None, tiny_overrides(tmp_path, **{**BAE, "algo.overlong.buffer": 4}))
    with pytest.raises(ValueError, match="algo.overlong.buffer"):
        loop.check_blockwise(cfg, {"c": get_task("confidence", base="addition@1")})
    loop.check_blockwise(load_config(None, tiny_overrides(tmp_path, **BAE)),
                         {"c": get_task("confidence", base="addition@1")})


@pytest.mark.slow
def test_bae_run_with_adaptive_entropy_checkpoints_the_coefficient(nano_model, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(loop, "score_many", _scripted_score_many(np.random.default_rng(0)))
    seen = []
    orig = blocks.blockwise_token_advantages

    def spy(r, c, v, ids, **kw):
        out = orig(r, c, v, ids, **kw)
        seen.append((ids, out[1]))
        return out

    monkeypatch.setattr(blocks, "blockwise_token_advantages", spy)
    extra = {**BAE, "train.steps": 3, "checkpoint.every": 0, "loss.adaptive_entropy": "true",
             "loss.target_entropy": 100.0, "loss.entropy_delta": 1e-3,
             "loss.entropy_coef_max": 2.5e-3}
    cfg = load_config(None, tiny_overrides(tmp_path, **extra))
    loop.run(cfg, stream=io.StringIO())
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")][:3]
    np.testing.assert_allclose([r["loss/entropy_coef"] for r in rows], [0.0, 1e-3, 2e-3],
                               rtol=1e-6)
    assert all(np.isfinite(r["loss/total"]) and "blocks/1/adv_abs_mean" in r for r in rows)
    # Advantages sit on block tokens only (the random nano policy rarely closes a block, so
    # block 0 spans the whole completion and EOS may join it).
    assert len(seen) == 3
    for ids, tok_adv in seen:
        assert np.all(tok_adv[ids < 0] == 0.0)
        assert np.any(tok_adv[ids == 0] != 0.0)
    from jaxgrpo.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path / "checkpoints", keep=1, asynchronous=False)
    state = loop.initial_state(cfg, loop.setup(cfg, stream=io.StringIO()).params)
    restored, _ = ck.restore(abstract_state=jax.eval_shape(lambda: state))
    ck.close()
    assert float(restored.entropy_coef) == pytest.approx(2.5e-3, rel=1e-6)


@pytest.mark.slow
def test_rlcr_baseline_is_grpo_on_the_structured_tasks_total_reward(nano_model, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setattr(loop, "score_many", _scripted_score_many(np.random.default_rng(1)))
    extra = {**BAE, "loss.estimator": "dr_grpo", "loss.agg": "token_mean", "train.steps": 1,
             "checkpoint.every": 0}
    cfg = load_config(None, tiny_overrides(tmp_path, **extra))
    loop.run(cfg, stream=io.StringIO())
    row = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert np.isfinite(row["loss/total"]) and "blocks/0/reward_mean" not in row


def test_rlcr_advantage_is_one_scalar_on_all_tokens():
    # The worked example: R = c - (q - c)^2 = [0.99, 0.84, -0.04, -0.49] gives A = R - mean(R).
    rewards = np.array([[0.99, 0.84, -0.04, -0.49]], np.float32)
    cfg = load_config(None, ["loss.estimator=dr_grpo"])
    adv = loop.compute_advantages(rewards, np.ones((1, 4), bool), cfg)
    np.testing.assert_allclose(adv[0], [0.665, 0.515, -0.365, -0.815], atol=1e-6)


@pytest.mark.parametrize("name", ["bae_demo.yaml", "bae_qwen2p5_3b_math.yaml",
                                  "rlcr_qwen2p5_3b_math.yaml"])
def test_bae_configs_load(name):
    cfg = load_config(ROOT / "configs" / name, check_paths=False)
    assert cfg.loss.kl_coef == 0.0
    if "rlcr" not in name:
        assert str(cfg.loss.estimator) == "blockwise" and str(cfg.loss.agg) == "block_mean"
        assert [str(b) for b in cfg.loss.block_baselines] == ["group_mean", "ocb"]
    if "qwen" in name:
        assert cfg.rollout.group_size == 32 and cfg.tasks.prompts_per_step == 64
        assert cfg.optim.lr == 1e-6 and cfg.optim.warmup_steps == 64
        assert cfg.loss.adaptive_entropy and cfg.loss.target_entropy == 0.2


@pytest.mark.slow
def test_bae_demo_config_smoke_run(nano_model, tmp_path):
    """configs/bae_demo.yaml as shipped (SFT warm start, real parser and verifier), shrunk."""
    over = {"train.workdir": str(tmp_path), "train.steps": 2, "train.eval_every": 0,
            "model.sft.steps": 3, "model.sft.batch_size": 4, "tasks.prompts_per_step": 4,
            "tasks.eval_prompts": 2, "rollout.group_size": 4, "rollout.eval_samples": 2,
            "checkpoint.every": 0, "checkpoint.asynchronous": False, "logging.progress": False,
            "mesh.devices": 1}
    cfg = load_config(ROOT / "configs" / "bae_demo.yaml", [f"{k}={v}" for k, v in over.items()])
    out = loop.run(cfg, stream=io.StringIO())
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")][:2]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert np.isfinite(r["loss/total"]) and r["blocks/0/present_frac"] > 0
        assert r["loss/entropy_coef"] >= 0
    assert set(out["accuracy_after"]) == {"confidence"}
