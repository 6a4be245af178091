"""Tunix's vanilla sampler, timed in its own environment: the worker half of the side-by-side in
``benchmarks/rollout_throughput.py --tunix-venv``.

The benchmark starts it as ``TUNIX_VENV/bin/python benchmarks/tunix_worker.py --model-dir D
--prompts P.npy --new-tokens N --ref-logits R.npy``. It imports only jax, numpy, flax and tunix
(never jaxgrpo), so it runs in an environment with ``google-tunix`` installed. It loads the HF
checkpoint ``D`` (written by ``jaxgrpo.model.hf.save_hf``) with Tunix's own Qwen2 loader and
checks that its last-position logits on the first prompts equal ``R`` (the jaxgrpo model's), so
both sides sample from the same weights.

Protocol (line-based JSON): every line the worker writes for the benchmark starts with
``PREFIX``; anything else on stdout is library noise and is ignored. After loading and one
warm-up call (which compiles), the worker writes ``{"ready": true, ...}``. Then it answers each
request line on stdin: ``{"cmd": "round", "seed": S}`` runs one timed call and writes
``{"round": S, ...}``; ``{"cmd": "exit"}`` (or end of input) ends it. A request it cannot
serve gets ``{"error": "..."}`` and the worker exits with status 1.

Two timings per round, both over ``B`` rows of ``N`` sampled tokens (temperature 1, no top-k or
top-p, no EOS: the EOS id is -1, which no token has, so every row runs all ``N`` steps):
``core_s``, the sampler's jitted prefill and decode from token arrays (``init_sample_state``,
``_compiled_prefill_fn``, ``_compiled_decode_fn``, what ``Sampler.__call__`` runs on device),
and ``call_s``, the public ``Sampler.__call__`` on the prompts written as text (one word per
token, so its tokenizer is a table lookup), which adds tokenising and detokenising on the host.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

PREFIX = "TUNIX-WORKER "


def emit(obj, out=None) -> None:
    """Write one protocol line."""
    out = sys.stdout if out is None else out
    out.write(PREFIX + json.dumps(obj) + "\n")
    out.flush()


def serve(ready, run_round, inp=None, out=None) -> int:
    """The worker's loop: ``ready()`` -> the ready message; ``run_round(seed)`` -> one round's
    message. Returns the exit status (0 after ``exit`` or end of input, 1 after a bad request)."""
    inp = sys.stdin if inp is None else inp
    emit({"ready": True, **ready()}, out)
    for line in inp:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            cmd = req["cmd"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            emit({"error": f"bad request {line.strip()!r}: {type(e).__name__}: {e}"}, out)
            return 1
        if cmd == "exit":
            return 0
        if cmd != "round" or not isinstance(req.get("seed"), int):
            emit({"error": f"bad request {line.strip()!r}: expected "
                           '{"cmd": "round", "seed": <int>} or {"cmd": "exit"}'}, out)
            return 1
        emit({"round": req["seed"], **run_round(req["seed"])}, out)
    return 0


class WordTokenizer:
    """Token ``i`` is the word ``t{i}``: the tokenizer interface Tunix's sampler asks for
    (``encode``, ``decode``, ``bos_id``, ``eos_id``, ``pad_id``), with no BOS."""

    def __init__(self, *, pad_id: int, eos_id: int):
        self._pad, self._eos = pad_id, eos_id

    def encode(self, text, **_):
        return [int(w[1:]) for w in text.split()]

    def decode(self, ids, **_):
        return " ".join(f"t{i}" for i in ids)

    def bos_id(self):
        return None

    def eos_id(self):
        return self._eos

    def pad_id(self):
        return self._pad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompts", required=True, help=".npy int32 [B, Tp], no padding")
    ap.add_argument("--ref-logits", required=True, help=".npy float32 [R, V]: rows 0..R-1")
    ap.add_argument("--new-tokens", type=int, required=True)
    ap.add_argument("--pad-id", type=int, default=0)
    args = ap.parse_args(argv)

    import importlib.metadata

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from tunix.generate import sampler as sampler_lib
    from tunix.models.qwen2 import model as qwen2_model
    from tunix.models.qwen2 import params as qwen2_params

    with open(f"{args.model_dir}/config.json") as f:
        hf = json.load(f)
    rope = hf.get("rope_parameters") or {}
    cfg = qwen2_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(rope.get("rope_theta", hf.get("rope_theta", 1e6))),
        norm_eps=hf["rms_norm_eps"], use_tied_embedding=hf["tie_word_embeddings"],
        dtype=jnp.float32, param_dtype=jnp.float32)
    model = qwen2_params.create_model_from_safe_tensors(args.model_dir, cfg, dtype=jnp.float32)
    n_params = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))

    prompts = np.load(args.prompts).astype(np.int32)
    ref = np.load(args.ref_logits)
    b, tp = prompts.shape
    tn = args.new_tokens
    if (prompts == args.pad_id).any():
        raise SystemExit(f"the prompts hold the pad id {args.pad_id}")
    r = ref.shape[0]
    pos = np.broadcast_to(np.arange(tp, dtype=np.int32)[None], (r, tp))
    causal = np.broadcast_to(np.tril(np.ones((tp, tp), bool))[None], (r, tp, tp))
    logits, _ = model(jnp.asarray(prompts[:r]), jnp.asarray(pos), None, jnp.asarray(causal))
    logits_diff = float(np.abs(np.asarray(logits[:, -1]) - ref).max())

    tok = WordTokenizer(pad_id=args.pad_id, eos_id=-1)
    sampler = sampler_lib.Sampler(model, tok, sampler_lib.CacheConfig(
        cache_size=tp + tn, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim))
    texts = [tok.decode(row.tolist()) for row in prompts]
    no_eos = [-1]  # no token has id -1: every row samples all tn tokens
    prompts_dev = jnp.asarray(prompts)

    def core(seed):
        sampler.eos_ids = jnp.array(no_eos)  # what __call__ sets from eos_tokens
        state = sampler.init_sample_state(
            prompts_dev, total_sampling_steps=tp + tn, include_logits=False,
            forbidden_token_ids=None, temperature=1.0, top_p=1.0, top_k=None,
            seed=jax.random.PRNGKey(seed), beam_size=None, include_logprobs=True)
        params = sampler._flattened_transformer_state
        state = sampler._compiled_prefill_fn(params, state, None, echo=False)
        state = sampler._compiled_decode_fn(params, state)
        jax.block_until_ready(state.token_buffer)
        return state

    def call(seed):
        out = sampler(texts, max_generation_steps=tn, max_prompt_length=tp, echo=False,
                      return_logprobs=True, eos_tokens=no_eos, temperature=1.0, top_p=1.0,
                      top_k=None, seed=seed)
        lengths = {len(t) for t in out.tokens}
        if lengths != {tn}:
            raise RuntimeError(f"Tunix completions are not all {tn} tokens: {sorted(lengths)}")
        return out

    t0 = time.perf_counter()
    st = core(0)
    call(0)
    warm_s = time.perf_counter() - t0
    if int(st.decoding_step) != tp + tn or bool(np.asarray(st.done).any()):
        raise RuntimeError(f"Tunix's decode stopped at step {int(st.decoding_step)} of {tp + tn}")

    def ready():
        return {"params": n_params, "tunix": importlib.metadata.version("google-tunix"),
                "jax": jax.__version__, "flax": importlib.metadata.version("flax"),
                "devices": str(jax.devices()), "batch": b, "prompt": tp, "new_tokens": tn,
                "logits_max_abs_diff": logits_diff, "warmup_s": warm_s}

    def run_round(seed):
        t0 = time.perf_counter()
        core(seed)
        t1 = time.perf_counter()
        call(seed)
        t2 = time.perf_counter()
        return {"core_s": t1 - t0, "call_s": t2 - t1, "tokens": b * tn}

    return serve(ready, run_round)


if __name__ == "__main__":
    sys.exit(main())
