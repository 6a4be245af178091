import nbformat as nbf
cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s.strip()))
code = lambda s: cells.append(nbf.v4.new_code_cell(s.strip()))
md("""
# The pure core on toy arrays

`jaxgrpo.core` is a set of model-free functions you can call from your own JAX code: advantages
from rewards, a clipped policy-gradient loss from log-probs, and log-probs from logits or hidden
states. This notebook uses them the way you would in a custom training loop: on a small group of
rewards, then on a toy batch of log-probs, taking a gradient at the end.

Shapes: rewards are `[P, G]` (prompts x completions per prompt); token arrays are `[N, T]` with
`N = P*G` rows, row `n = p*G + g`.
""")
code("""
import jax
import jax.numpy as jnp
import numpy as np

from jaxgrpo.core import advantages, logprobs, losses

np.set_printoptions(precision=4, suppress=True)
""")
md("""
## 1. One group, four conventions

Two prompts with four completions each. The second prompt's completions all scored the same, so
no convention can learn anything from it: its advantages are exactly zero (never NaN).
""")
code("""
rewards = jnp.array([[1.0, 0.0, 1.0, 0.5],
                     [1.0, 1.0, 1.0, 1.0]])
conventions = {
    "GRPO (z-score, ddof=0)": dict(),
    "Tunix / verl (ddof=1, eps=1e-6)": dict(std_ddof=1, eps=1e-6),
    "TRL (ddof=1, eps=1e-4)": dict(std_ddof=1, eps=1e-4),
    "Dr. GRPO (no std)": dict(scale="none"),
    "RLOO (leave-one-out)": dict(baseline="leave_one_out", scale="none"),
}
for name, kw in conventions.items():
    print(f"{name:34s}", np.asarray(advantages.group_relative(rewards, **kw)[0]))
""")
code("""
# Samples can be marked invalid (e.g. a verifier error): they get 0 and leave the group statistics.
valid = jnp.array([[True, True, False, True], [True, True, True, True]])
print(np.asarray(advantages.group_relative(rewards, valid)))
""")
md("""
## 2. Blockwise advantages with an outcome-conditioned baseline (BAE + OCB)

The BAE paper's worked example: one prompt, `G = 4` completions with a solution block (reward:
correctness `c`) and a confidence block (reward: Brier score `-(q - c)^2`). The confidence block's
baseline is the mean over the samples of the same group *with the same correctness* (OCB).
""")
code("""
c = jnp.array([[1.0, 1.0, 0.0, 0.0]])
q = jnp.array([[0.9, 0.6, 0.2, 0.7]])
block_rewards = jnp.stack([c, -(q - c) ** 2], axis=-1)          # [P, G, K=2]
outcomes = jnp.stack([c, c], axis=-1).astype(jnp.int32)         # stratify block 1 by correctness
A_ocb = advantages.blockwise(block_rewards, outcomes, baselines=["group_mean", "ocb"])
A_gm = advantages.blockwise(block_rewards, outcomes, baselines=["group_mean", "group_mean"])
print("solution block  :", np.asarray(A_ocb[0, :, 0]))
print("confidence, OCB :", np.asarray(A_ocb[0, :, 1]))
print("confidence, mean:", np.asarray(A_gm[0, :, 1]))
""")
md("""
Each block's advantage applies only to its own tokens. Given per-token block ids (`-1` outside any
block), the helpers broadcast block advantages to tokens and give BAE's per-block token weights.
""")
code("""
block_ids = jnp.array([[-1, -1, 0, 0, 0, 1, 1],     # 2 prompt tokens, 3 solution, 2 confidence
                       [-1, -1, 0, 0, 1, 1, 1],
                       [-1, -1, 0, 0, 0, 0, 1],
                       [-1, -1, 0, 1, 1, 1, 1]])
A_tok = advantages.token_advantages(A_ocb.reshape(4, 2), block_ids)
w_tok = advantages.block_token_weights(block_ids, 2)
print(np.asarray(A_tok)); print(np.asarray(w_tok))
""")
md("""
## 3. A loss and its gradient

`policy_loss` takes log-probs, never a model. Here the current policy equals the old one, so the
ratio is 1 and no clipping happens; the gradient with respect to the log-probs is the (signed,
normalised) advantage on every completion token and exactly zero on masked tokens.
""")
code("""
N, T = 4, 7
logp = jnp.full((N, T), -1.0)
mask = block_ids >= 0
adv = advantages.group_relative(c)[0]                       # one advantage per sequence, [N]
modes = {"token_mean": {}, "seq_mean_token_mean": {}, "seq_mean_token_sum_norm": {"max_len": T}}
for agg, kw in modes.items():
    loss_fn = lambda lp: losses.policy_loss(lp, logp, adv, mask, agg=agg, **kw)[0]
    loss, g = jax.value_and_grad(loss_fn)(logp)
    print(agg, float(loss)); print(np.asarray(g))
""")
code("""
# BAE's block_mean aggregation with per-token advantages and block weights:
loss, aux = losses.policy_loss(logp, logp, A_tok, mask, agg="block_mean", token_weights=w_tok)
print(float(loss), {k: float(v) for k, v in aux.items()})
""")
md("""
## 4. Log-probs without the `[N, T, V]` logits

`chunked_token_logprobs` computes the same values as `token_logprobs` from final hidden states
and the unembedding matrix, a chunk of positions at a time, so neither the forward nor the
backward pass holds the full logits tensor.
""")
code("""
key = jax.random.key(0)
h = jax.random.normal(key, (2, 9, 16))
W = jax.random.normal(jax.random.key(1), (16, 50)) / 4
tgt = jax.random.randint(jax.random.key(2), (2, 9), 0, 50)
full = logprobs.token_logprobs(h @ W, tgt)
chunked = logprobs.chunked_token_logprobs(h, W, tgt, chunk_size=4)
print("max |full - chunked| =", float(jnp.max(jnp.abs(full - chunked))))
""")
nb = nbf.v4.new_notebook(); nb["cells"] = cells
nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "notebooks/01_pure_core.ipynb")
