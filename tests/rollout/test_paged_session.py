"""The streaming interface of the paged engine: per-uid reproducibility across submissions,
each prompt returned once, cancellation and page accounting, no recompilation, bad input."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxgrpo.model import ModelConfig, Transformer
from jaxgrpo.rollout import engine as engine_mod
from jaxgrpo.rollout.engine import FinishedPrompt, PagedOptions, PagedSession
from tests.rollout.test_engine import BUCKETS, SMALL, TN, V, _prompts, compiles_nothing

G = 4
# Sampled, with EOS and a stop sequence: completions of many lengths, some ended, some not.
KW = dict(num_samples=G, max_new_tokens=TN, temperature=1.2, top_k=0, top_p=1.0,
          eos_ids=(5, 17), stop_sequences=((7, 7),), greedy=False, pad_id=0, buckets=BUCKETS,
          eos_logit_bias=2.0)
FIELDS = ("tokens", "logprobs", "mask", "lengths", "truncated")


@pytest.fixture(scope="module")
def split_model():
    cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    m.embedding.set_value(m.embedding.get_value() * 3.0)  # far from uniform sampling
    return nnx.split(m)


def _session(split_model, options, key=7, width=16):
    graphdef, state = split_model
    return PagedSession(graphdef, state, jax.random.key(key), prompt_width=width,
                        options=options, **KW)


def _generate(split_model, tokens, mask, options, key=7):
    graphdef, state = split_model
    return engine_mod.generate_paged(graphdef, state, tokens, mask, jax.random.key(key),
                                     options=options, **KW)


def _drain(session):
    """Runs until nothing is outstanding; every uid once, ``outstanding`` counting down."""
    out = {}
    while session.outstanding:
        before = session.outstanding
        finished = session.run()
        assert finished, "run() returned nothing with prompts outstanding"
        for f in finished:
            assert f.uid not in out, f"uid {f.uid} returned twice"
            out[f.uid] = f
        assert session.outstanding == before - len(finished)
    assert session.run() == [] and session.outstanding == 0
    return out


def _assert_equal_to_rollout(finished, rollout, uid_to_row):
    for u, f in finished.items():
        row = uid_to_row[u]
        for name in ("tokens", "mask", "lengths", "truncated"):
            np.testing.assert_array_equal(getattr(f, name), np.asarray(getattr(rollout, name))[row],
                                          err_msg=f"{name} uid {u}")
        # Another batch shape changes the matmuls' summation order, not the sampled tokens.
        np.testing.assert_allclose(f.logprobs, np.asarray(rollout.logprobs)[row], atol=1e-5,
                                   rtol=0, err_msg=f"logprobs uid {u}")


def _assert_idle_and_every_page_free(session):
    assert session.stats["pages_in_use_at_end"] == 0
    num_pages = session.stats["pool_pages"]
    assert sorted(session._free_pages) == list(range(1, num_pages))  # none lost, none twice
    assert session._prompt_used == 0 and not session._busy.any()


LENGTHS = [3, 9, 14, 1, 6, 11, 2, 8, 16]


@pytest.mark.parametrize("slots", [8, pytest.param(64, marks=pytest.mark.slow)])
def test_two_submissions_give_the_completions_of_one_call(split_model, slots):
    # Few steps per round: the first prompts are still decoding when the second batch comes.
    opts = PagedOptions(max_slots=slots, steps_per_sync=4, page_size=4)
    tokens, mask = _prompts(LENGTHS, seed=3)
    ref = _generate(split_model, tokens, mask, opts)
    lengths = np.asarray(ref.lengths)
    assert (~np.asarray(ref.truncated)).any() and len(np.unique(lengths)) > 3
    s = _session(split_model, opts)
    first, second = [0, 6, 3, 8], [1, 7, 2, 5, 4]  # prompt 0 ends first
    s.submit(tokens[first], mask[first], first)
    got = {f.uid: f for f in s.run()}
    assert got and s.outstanding == len(first) - len(got)
    assert s.outstanding > 0 and s._busy.any()  # still decoding
    # The second batch is narrower than the first (and the session's width): left padding.
    s.submit(tokens[second, 2:], mask[second, 2:], second)
    assert s.outstanding == len(first) + len(second) - len(got)
    rest = _drain(s)
    assert not set(rest) & set(got)
    got.update(rest)
    assert sorted(got) == list(range(len(LENGTHS)))
    _assert_equal_to_rollout(got, ref, {u: u for u in got})
    _assert_idle_and_every_page_free(s)


def test_run_returns_each_prompt_once_as_it_finishes(split_model):
    tokens, mask = _prompts(LENGTHS[:6], seed=4)
    s = _session(split_model, SMALL)
    uids = [40, 3, 17, 8, 1000, 2]
    s.submit(tokens, mask, uids)
    assert s.outstanding == 6
    calls, seen, rounds = 0, [], []
    while s.outstanding:
        finished = s.run()
        calls += 1
        rounds.append(s.stats["rounds"])
        assert finished
        seen += [f.uid for f in finished]
        for f in finished:
            assert isinstance(f, FinishedPrompt)
            assert f.tokens.shape == f.logprobs.shape == f.mask.shape == (G, TN)
            assert f.tokens.dtype == np.int32 and f.logprobs.dtype == np.float32
            assert f.lengths.dtype == np.int32 and f.truncated.dtype == bool
            np.testing.assert_array_equal(f.mask, np.arange(TN)[None] < f.lengths[:, None])
            assert (f.tokens[~f.mask] == 0).all() and (f.logprobs[~f.mask] == 0).all()
            assert (f.logprobs[f.mask] < 0).all()
    assert sorted(seen) == sorted(uids) and s.outstanding == 0
    # 3 slots for 24 requests: the prompts come back over several calls, one call per round
    # in which some prompt finished, not all at the end.
    assert calls > 2 and len(set(rounds)) == calls
    assert s.run() == []
    _assert_idle_and_every_page_free(s)


def test_cancel_frees_everything_and_the_session_goes_on(split_model):
    tokens, mask = _prompts(LENGTHS[:6], width=16, seed=5)
    s = _session(split_model, SMALL)
    s.submit(tokens, mask, range(6))
    done = {f.uid for f in s.run()}
    assert s._queue and s._busy.any()  # some requests waiting, some decoding
    assert s.stats["pages_in_use_at_end"] > 0
    dropped = s.cancel()
    assert dropped == [u for u in range(6) if u not in done] and dropped
    assert s.outstanding == 0 and s.run() == []
    _assert_idle_and_every_page_free(s)
    assert s.stats["cancelled_prompts"] == len(dropped)
    # The dropped prompts again (new uids), then more prompts submitted mid-way: equal to a
    # fresh call over all the prompts, in which uid = row.
    more_t, more_m = _prompts([5, 13, 1], width=16, seed=6)
    all_t = np.concatenate([tokens, tokens[dropped], more_t])
    all_m = np.concatenate([mask, mask[dropped], more_m])
    again = list(range(6, 6 + len(dropped)))
    s.submit(tokens[dropped], mask[dropped], again)
    got = {f.uid: f for f in s.run()}
    s.submit(more_t, more_m, range(again[-1] + 1, len(all_t)))
    got.update(_drain(s))
    assert sorted(got) == list(range(6, len(all_t)))
    ref = _generate(split_model, all_t, all_m, SMALL)
    _assert_equal_to_rollout(got, ref, {u: u for u in got})
    _assert_idle_and_every_page_free(s)


def test_cancel_and_resubmit_cycles_never_exhaust_the_pool(split_model):
    """Cancelling at every stage (nothing admitted, mid-prefill-wave, mid-decode) returns every
    page; a pool sized for the slots keeps serving any later mix."""
    opts = PagedOptions(max_slots=8, page_size=4)
    s = _session(split_model, opts)
    uid = 0
    for cycle in range(6):
        tokens, mask = _prompts(LENGTHS[cycle:] + LENGTHS[:cycle], seed=10 + cycle)
        s.submit(tokens, mask, range(uid, uid + len(tokens)))
        uid += len(tokens)
        for _ in range(cycle % 3):
            s.run()
        s.cancel()
        _assert_idle_and_every_page_free(s)
    tokens, mask = _prompts(LENGTHS, seed=20)
    s.submit(tokens, mask, range(uid, uid + len(tokens)))
    assert len(_drain(s)) == len(LENGTHS)
    _assert_idle_and_every_page_free(s)


def test_later_sessions_and_submits_compile_nothing(split_model):
    opts = PagedOptions(max_slots=16, page_size=4)  # row buckets 8 and 16
    s = _session(split_model, opts)
    s.submit(*_prompts([3]), [0])
    _drain(s)
    with compiles_nothing():
        s2 = _session(split_model, opts, key=8)
        s2.submit(*_prompts([16, 1, 5, 9, 2], seed=1), range(5))
        s2.run()
        s2.cancel()
        s2.submit(*_prompts([7, 12], seed=2), [5, 6])
        _drain(s2)
        s.submit(*_prompts([4, 4, 10], seed=3), [1, 2, 3])
        _drain(s)


@pytest.mark.parametrize("case,match", [
    ("reused", "uid 2 was already submitted to this session"),
    ("reused_cancelled", "uid 1 was already submitted to this session"),
    ("duplicate", "uids must be distinct"),
    ("negative", r"uids must be ints in \[0, 2\*\*31\)"),
    ("too_wide", "prompts are 20 tokens wide, wider than this session's 16"),
    ("mask_shape", r"prompt_mask must be a bool array of prompt_tokens' shape \(2, 5\)"),
    ("uid_count", "got 3 uids for 2 prompts"),
    ("one_dim", r"prompt_tokens must be an int array \[P, Tp\]"),
    ("right_padded", "prompt_mask must be left-padded"),
    ("vocab", r"prompt tokens must be in \[0, 61\)"),
])
def test_bad_submits_are_one_line_errors_and_queue_nothing(split_model, case, match):
    s = _session(split_model, SMALL)
    s.submit(*_prompts([2]), [1])
    s.cancel()
    s.submit(*_prompts([4]), [2])
    tokens, mask = _prompts([3, 5], seed=1)
    uids = [10, 11]
    if case == "reused":
        uids = [10, 2]
    elif case == "reused_cancelled":
        uids = [1, 11]
    elif case == "duplicate":
        uids = [10, 10]
    elif case == "negative":
        uids = [10, -1]
    elif case == "too_wide":
        tokens, mask = _prompts([3, 20])
    elif case == "mask_shape":
        mask = mask[:, 1:]
    elif case == "uid_count":
        uids = [10, 11, 12]
    elif case == "one_dim":
        tokens, mask = tokens[0], mask[0]
    elif case == "right_padded":
        mask = mask[:, ::-1].copy()
    elif case == "vocab":
        tokens = tokens.copy()
        tokens[1, -1] = V
    with pytest.raises(ValueError, match=match) as info:
        s.submit(tokens, mask, uids)
    assert "\n" not in str(info.value)
    assert s.outstanding == 1 and len(s._queue) == G
    s.submit(*_prompts([3, 5], seed=1), [10, 11])  # the refused uids stay free
    assert sorted(_drain(s)) == [2, 10, 11]


def test_bad_session_arguments(split_model):
    graphdef, state = split_model
    kw = dict(KW, prompt_width=16)
    with pytest.raises(TypeError, match="options must be a PagedOptions"):
        PagedSession(graphdef, state, jax.random.key(0), options={"max_slots": 3}, **kw)
    with pytest.raises(ValueError, match="prompt_width must be a positive int, got 0"):
        PagedSession(graphdef, state, jax.random.key(0), options=SMALL, **dict(kw, prompt_width=0))
