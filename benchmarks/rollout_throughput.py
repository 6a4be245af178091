"""Prefill / decode / training throughput of the policy model, as a fraction of the f32 matmul peak.

Usage (from the repository root):
    PYTHONPATH=$PWD python benchmarks/rollout_throughput.py [--batches 1 16 256] [--repeats 3]
    PYTHONPATH=$PWD python benchmarks/rollout_throughput.py --engines [--requests 256 ...]
    PYTHONPATH=$PWD python benchmarks/rollout_throughput.py --tunix-venv TUNIX_VENV \
        [--tunix-batch 256 --prompt 32 --new-tokens 64 --repeats 3] [--out FILE]

``--engines`` compares the static sampler with the paged engine instead (one run, JSON):
completion lengths made geometric (mean ``--mean-len``) by an EOS logit bias, useful tokens/s at
budget ``--budget`` for both engines, the paged engine's tokens/s at budgets ``--budget-small``
and ``--budget-large``, and the KV memory of ``--mem-prompts`` x G ``--mem-group`` rows
(prompt ``--mem-prompt``, budget ``--mem-budget``) from the compiled programs' memory analysis.

``--tunix-venv`` runs fixed-length decode side by side with Tunix's vanilla sampler instead
(``tunix.generate.sampler.Sampler``; the environment holds ``pip install google-tunix==0.1.7``):
``--tunix-batch`` prompts of ``--prompt`` random tokens, ``--new-tokens`` sampled tokens each
(temperature 1, no top-k/top-p, no EOS), by the static and the paged engine in this process and
by Tunix in ``benchmarks/tunix_worker.py`` under that environment's python, on the same weights
(``ModelConfig.bench29m()`` exported with ``save_hf`` and loaded by Tunix's Qwen2 loader; the
worker checks the logits). Each side compiles in a warm-up call first; then ``--repeats`` rounds
run the three in turn (the order rotates each round) and the JSON holds tokens/s of each from
the median times, the ratios, and the machine's load averages before and after.

Prints one JSON object. Every throughput is reported with its achieved model FLOP/s as a fraction
of the float32 matmul peak (2048^3 jitted matmul, median) measured in the same run, because
absolute times on a shared CPU are noisy. FLOPs per token: 2 * matmul parameters (layers plus the
unembedding) + 4 * layers * heads * head_dim * context (scores and values), context counted
causally; training (forward + backward) counts 3x the forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrpo.model import ModelConfig, Transformer
from jaxgrpo.model.hf import save_hf
from jaxgrpo.rollout import PagedOptions, generate_functional
from jaxgrpo.rollout import engine as engine_lib
from jaxgrpo.rollout import sampler as sampler_lib


def _median_time(fn, repeats):
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(repeats: int) -> float:
    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    t = _median_time(lambda: f(a, b).block_until_ready(), max(repeats, 5))
    return 2 * n**3 / t


def _attn_flops(cfg: ModelConfig, contexts) -> float:
    return 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * float(np.sum(contexts))


def bench_prefill(model, batch, prompt_len, repeats, peak):
    cfg = model.cfg
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, tokens):
        m = nnx.merge(graphdef, state)
        valid = jnp.ones(tokens.shape, bool)
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32)[None], tokens.shape)
        h, cache = m.forward_cached(tokens, pos, m.init_cache(tokens.shape[0], tokens.shape[1]),
                                    jnp.int32(0), valid)
        return m.logits(h[:, -1]), cache

    tokens = jax.random.randint(jax.random.key(2), (batch, prompt_len), 0, cfg.vocab_size,
                                jnp.int32)
    t = _median_time(lambda: jax.block_until_ready(prefill(state, tokens)), repeats)
    n_tok = batch * prompt_len
    # Hidden states for every position, unembedding only for the last one.
    flops = (2.0 * (cfg.matmul_params - cfg.vocab_size * cfg.hidden_size) * n_tok
             + 2.0 * cfg.vocab_size * cfg.hidden_size * batch
             + batch * _attn_flops(cfg, np.arange(1, prompt_len + 1)))
    return {"batch": batch, "tokens_per_s": n_tok / t, "seconds": t,
            "flops_fraction_of_peak": flops / t / peak}


def bench_decode(model, batch, prompt_len, new_tokens, repeats, peak, temperature=1.0):
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (batch, prompt_len), 0,
                                           cfg.vocab_size, jnp.int32))
    mask = np.ones_like(tokens, bool)
    keys = iter(jax.random.split(jax.random.key(4), repeats + 1))

    def run():
        r = generate_functional(graphdef, state, tokens, mask, next(keys), num_samples=1,
                                max_new_tokens=new_tokens, temperature=temperature,
                                buckets=(prompt_len,))
        jax.block_until_ready(r.tokens)
        assert int(r.lengths.min()) == new_tokens  # no EOS: every step runs

    t = _median_time(run, repeats)
    n_tok = batch * new_tokens
    prefill_flops = (2.0 * cfg.matmul_params * batch * prompt_len
                     + batch * _attn_flops(cfg, np.arange(1, prompt_len + 1)))
    decode_flops = (2.0 * cfg.matmul_params * n_tok
                    + batch * _attn_flops(cfg, prompt_len + np.arange(new_tokens)))
    return {"batch": batch, "prompt": prompt_len, "new_tokens": new_tokens,
            "tokens_per_s": n_tok / t, "seconds": t,
            "flops_fraction_of_peak": (prefill_flops + decode_flops) / t / peak,
            "note": "time includes the prefill; FLOPs include it too"}


def bench_train(model, batch, seq_len, repeats, peak):
    cfg = model.cfg
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens):
        def loss_fn(state):
            logits = nnx.merge(graphdef, state)(tokens[:, :-1])
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

        return jax.value_and_grad(loss_fn)(state)

    tokens = jax.random.randint(jax.random.key(5), (batch, seq_len + 1), 0, cfg.vocab_size,
                                jnp.int32)
    t = _median_time(lambda: jax.block_until_ready(step(state, tokens)), repeats)
    n_tok = batch * seq_len
    flops = 3.0 * (2.0 * cfg.matmul_params * n_tok
                   + batch * _attn_flops(cfg, np.arange(1, seq_len + 1)))
    return {"batch": batch, "seq_len": seq_len, "tokens_per_s": n_tok / t, "seconds": t,
            "flops_fraction_of_peak": flops / t / peak}


# ---- static sampler vs paged engine ------------------------------------------------------------

EOS = 1  # the benchmark's EOS token id


def eos_bias_for_mean(model, tokens, mean_len):
    """The EOS logit bias that makes the per-token EOS probability ``1 / mean_len`` at the
    prompts' last position (odds scale by ``exp(bias)``): geometric lengths of that mean."""
    logits = np.asarray(model(jnp.asarray(tokens))[:, -1], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    p = float(np.exp(logp[:, EOS]).mean())
    q = 1.0 / mean_len
    return float(np.log(q / (1 - q)) - np.log(p / (1 - p)))


def run_engine(graphdef, state, tokens, key, *, engine, group, budget, bias, paged,
               repeats):
    """Useful tokens/s (completion tokens up to EOS) of one engine; warm-up compiles with a
    bias that ends every row at once (the bias is a traced value: same programs)."""
    mask = np.ones_like(tokens, bool)
    kw = dict(num_samples=group, max_new_tokens=budget, eos_ids=(EOS,), engine=engine,
              paged=paged, buckets=(tokens.shape[1],))
    jax.block_until_ready(generate_functional(graphdef, state, tokens, mask, key,
                                              eos_logit_bias=100.0, **kw).tokens)
    times, useful, stats = [], [], {}
    for r in range(repeats):
        t0 = time.perf_counter()
        if engine == "paged":
            graph_kw = dict(kw)
            del graph_kw["engine"], graph_kw["paged"]
            out = engine_lib.generate_paged(
                graphdef, state, tokens, mask, jax.random.fold_in(key, r), options=paged,
                temperature=1.0, top_k=0, top_p=1.0, stop_sequences=(), greedy=False, pad_id=0,
                eos_logit_bias=bias, stats=stats, **graph_kw)
        else:
            out = generate_functional(graphdef, state, tokens, mask, jax.random.fold_in(key, r),
                                      eos_logit_bias=bias, **kw)
        lengths = np.asarray(out.lengths)
        times.append(time.perf_counter() - t0)
        useful.append(int(lengths.sum()))
    t = statistics.median(times)
    res = {"engine": engine, "budget": budget, "requests": int(tokens.shape[0] * group),
           "useful_tokens": useful, "seconds": times,
           "useful_tokens_per_s": float(np.median(np.array(useful) / np.array(times))),
           "mean_length": float(np.mean(useful)) / (tokens.shape[0] * group),
           "median_seconds": t}
    if engine == "paged":
        res["paged"] = dataclasses.asdict(paged)
        res["stats_last_run"] = stats
    return res


def kv_memory(cfg, graphdef, state, *, prompts, group, prompt_len, budget, slots):
    """Compiled memory analysis of the static program and of the paged round program."""
    sds = jax.ShapeDtypeStruct
    st = jax.tree.map(lambda a: sds(a.shape, a.dtype), state)
    eos = sds((4,), jnp.int32)
    static = sampler_lib._generate_jit.lower(
        graphdef, st, sds((prompts, prompt_len), jnp.int32), sds((prompts, prompt_len), bool),
        jax.random.key(0), sds((), jnp.float32), eos, num_samples=group,
        max_new_tokens=budget, top_k=0, top_p=1.0, stop_sequences=(), greedy=False,
        pad_id=0, eos_bias=sds((), jnp.float32)).compile().memory_analysis()
    n = prompts * group
    itemsize = 4
    static_kv = 2 * cfg.num_layers * n * cfg.num_kv_heads * (prompt_len + budget) \
        * cfg.head_dim * itemsize
    out = {"prompts": prompts, "group": group, "prompt": prompt_len, "budget": budget,
           "static": {"temp_bytes": static.temp_size_in_bytes,
                      "argument_bytes": static.argument_size_in_bytes,
                      "output_bytes": static.output_size_in_bytes, "kv_cache_bytes": static_kv}}
    for sl in slots:
        opts = PagedOptions(max_slots=sl)
        pages = engine_lib.pool_pages(opts, num_samples=group, prompt_bucket=prompt_len,
                                      max_new_tokens=budget)
        width = -(-(prompt_len + budget) // opts.page_size)
        pool = sds((pages, opts.page_size, 2 * cfg.num_kv_heads, cfg.head_dim), jnp.float32)
        i32 = lambda *shape: sds(shape, jnp.int32)  # noqa: E731
        rnd = engine_lib._round_jit.lower(
            graphdef, st, [pool] * cfg.num_layers, i32(sl, width), i32(sl), i32(sl),
            sds((sl,), bool), i32(sl), i32(sl), i32(sl), i32(sl), i32(sl), jax.random.key(0),
            i32(), i32(), sds((), jnp.float32), eos, sds((), jnp.float32),
            steps=opts.steps_per_sync,
            max_new_tokens=budget, top_k=0, top_p=1.0, greedy=False,
            pages_per_block=opts.pages_per_block).compile().memory_analysis()
        kv = engine_lib.kv_bytes(opts, cfg, num_samples=group, prompt_bucket=prompt_len,
                                 max_new_tokens=budget)
        out[f"paged_{sl}_slots"] = {
            "temp_bytes": rnd.temp_size_in_bytes, "argument_bytes": rnd.argument_size_in_bytes,
            "output_bytes": rnd.output_size_in_bytes, "alias_bytes": rnd.alias_size_in_bytes,
            "kv_pool_bytes": kv, "pool_pages": pages,
            "kv_ratio_vs_static_cache": kv / static_kv,
            # The static program holds its cache in temporaries, the round program's pools are
            # donated arguments: compare the program totals.
            "total_ratio_vs_static": (rnd.temp_size_in_bytes + rnd.argument_size_in_bytes)
            / (static.temp_size_in_bytes + static.argument_size_in_bytes)}
    return out


def engines_main(args):
    cfg = ModelConfig.bench29m()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    prompts = args.requests // args.group
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (prompts, args.prompt), 2,
                                           cfg.vocab_size, jnp.int32))
    bias = eos_bias_for_mean(model, tokens, args.mean_len)
    paged = PagedOptions(max_slots=args.slots, steps_per_sync=args.steps_per_sync)
    key = jax.random.key(4)
    out = {"config": "ModelConfig.bench29m()", "params": cfg.num_params, "dtype": "float32",
           "devices": str(jax.devices()), "eos_logit_bias": bias,
           "length_distribution": f"geometric, mean {args.mean_len} (EOS logit bias)",
           "prompt": args.prompt, "group": args.group,
           "load_average_1_5_15_min_at_start": list(os.getloadavg())}
    run = functools.partial(run_engine, graphdef, state, tokens, key, group=args.group,
                            bias=bias, repeats=args.repeats)
    static = run(engine="static", budget=args.budget, paged=None)
    print(json.dumps({"progress": "static", **static}), flush=True)
    pg = run(engine="paged", budget=args.budget, paged=paged)
    print(json.dumps({"progress": "paged", **pg}), flush=True)
    out["spread"] = {"static": static, "paged": pg,
                     "paged_over_static_tokens_per_s":
                         pg["useful_tokens_per_s"] / static["useful_tokens_per_s"]}
    small = run(engine="paged", budget=args.budget_small, paged=paged)
    large = run(engine="paged", budget=args.budget_large, paged=paged)
    out["budget_independence"] = {
        "small": small, "large": large,
        "large_over_small_tokens_per_s":
            large["useful_tokens_per_s"] / small["useful_tokens_per_s"]}
    print(json.dumps({"progress": "budgets", **out["budget_independence"]}), flush=True)
    if not args.skip_memory:
        out["kv_memory"] = kv_memory(cfg, graphdef, state, prompts=args.mem_prompts,
                                     group=args.mem_group, prompt_len=args.mem_prompt,
                                     budget=args.mem_budget,
                                     slots=(args.mem_prompts * args.mem_group, args.slots))
    out["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    print(json.dumps(out, indent=1))


# ---- side by side with Tunix's vanilla sampler -------------------------------------------------

TUNIX_PREFIX = "TUNIX-WORKER "  # benchmarks/tunix_worker.py writes its protocol lines with it
TUNIX_WORKER = pathlib.Path(__file__).resolve().with_name("tunix_worker.py")


class WorkerError(RuntimeError):
    """The Tunix worker ended or answered with an error."""


class TunixWorker:
    """``benchmarks/tunix_worker.py`` as a subprocess under another environment's python, spoken
    to one JSON line at a time (protocol in that file's docstring); its stderr goes to a
    temporary file whose tail is quoted when it fails."""

    def __init__(self, cmd, *, env=None):
        self._err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, bufsize=1, env=env)

    def _stderr_tail(self, n=3000):
        self._err.seek(0)
        return self._err.read()[-n:]

    def read(self) -> dict:
        """The next protocol message (other stdout lines are skipped)."""
        for line in self.proc.stdout:
            if not line.startswith(TUNIX_PREFIX):
                continue
            msg = json.loads(line[len(TUNIX_PREFIX):])
            if "error" in msg:
                raise WorkerError(f"the Tunix worker refused a request: {msg['error']}")
            return msg
        code = self.proc.wait()
        raise WorkerError(f"the Tunix worker ended (exit {code}) without answering; its "
                          f"stderr ends:\n{self._stderr_tail()}")

    def request(self, msg: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            code = self.proc.wait()
            raise WorkerError(f"the Tunix worker ended (exit {code}); its stderr ends:\n"
                              f"{self._stderr_tail()}") from None
        return self.read()

    def close(self) -> int:
        """Ask the worker to exit; kill it if it has not within 60 s. Returns its status."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        return self.proc.returncode


def tunix_python(venv) -> str:
    """The python of the Tunix environment; a clear error when there is none."""
    py = pathlib.Path(venv) / "bin" / "python"
    if not (py.is_file() and os.access(py, os.X_OK)):
        raise ValueError(f"--tunix-venv {venv}: no executable {py} (create the environment with "
                         "python3 -m venv DIR && DIR/bin/pip install google-tunix==0.1.7)")
    return str(py)


def _time_ours(graphdef, state, tokens, seed, *, engine, paged, new_tokens):
    mask = np.ones_like(tokens, bool)
    t0 = time.perf_counter()
    out = generate_functional(graphdef, state, tokens, mask, jax.random.key(seed), num_samples=1,
                              max_new_tokens=new_tokens, temperature=1.0, eos_ids=(),
                              engine=engine, paged=paged, buckets=(tokens.shape[1],))
    jax.block_until_ready(out.tokens)
    t = time.perf_counter() - t0
    if int(np.asarray(out.lengths).min()) != new_tokens:
        raise RuntimeError(f"engine {engine!r}: a row ended before {new_tokens} tokens")
    return t


def _fixed_decode_flops(cfg, batch, prompt_len, new_tokens):
    """Model FLOPs of one fixed-length call: the prompt's forward (unembedding at its last
    position only) and ``new_tokens - 1`` decode steps (the last sampled token is not fed back),
    counted as in the module docstring."""
    body = cfg.matmul_params - cfg.vocab_size * cfg.hidden_size
    prefill = (2.0 * body * batch * prompt_len + 2.0 * cfg.vocab_size * cfg.hidden_size * batch
               + batch * _attn_flops(cfg, np.arange(1, prompt_len + 1)))
    steps = new_tokens - 1
    decode = (2.0 * cfg.matmul_params * batch * steps
              + batch * _attn_flops(cfg, prompt_len + 1 + np.arange(steps)))
    return prefill + decode


def tunix_main(args, python, *, worker_cmd=None):
    """Fixed-length decode: the static and paged engines against Tunix's vanilla sampler."""
    cfg = ModelConfig.bench29m()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    b, tp, tn = args.tunix_batch, args.prompt, args.new_tokens
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (b, tp), 2, cfg.vocab_size,
                                           jnp.int32))
    paged = PagedOptions(max_slots=b, steps_per_sync=args.steps_per_sync)
    load_before = os.getloadavg()
    peak_before = matmul_peak(5)
    n_ref = min(4, b)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        save_hf(model, tmp / "model")
        np.save(tmp / "prompts.npy", tokens)
        np.save(tmp / "ref_logits.npy", np.asarray(model(jnp.asarray(tokens[:n_ref]))[:, -1]))
        cmd = worker_cmd or [python, str(TUNIX_WORKER)]
        cmd = [*cmd, "--model-dir", str(tmp / "model"), "--prompts", str(tmp / "prompts.npy"),
               "--ref-logits", str(tmp / "ref_logits.npy"), "--new-tokens", str(tn)]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        worker = TunixWorker(cmd, env=env)
        try:
            run = {
                "static": functools.partial(_time_ours, graphdef, state, tokens, engine="static",
                                            paged=None, new_tokens=tn),
                "paged": functools.partial(_time_ours, graphdef, state, tokens, engine="paged",
                                           paged=paged, new_tokens=tn),
            }
            warm = {name: fn(seed=0) for name, fn in run.items()}  # compiles
            ready = worker.read()  # the worker compiled in its own warm-up call
            if ready.get("params") != cfg.num_params:
                raise WorkerError(f"parameter counts differ: Tunix {ready.get('params')}, "
                                  f"jaxgrpo {cfg.num_params}")
            if not ready.get("logits_max_abs_diff", np.inf) <= 1e-4:
                raise WorkerError("Tunix's model does not reproduce jaxgrpo's logits (max abs "
                                  f"diff {ready.get('logits_max_abs_diff')}): weights differ")
            rounds = []
            names = ["static", "paged", "tunix"]
            for r in range(args.repeats):
                order = names[r % 3:] + names[:r % 3]
                row = {"order": order}
                for name in order:
                    if name == "tunix":
                        msg = worker.request({"cmd": "round", "seed": r + 1})
                        row["tunix_core"], row["tunix_call"] = msg["core_s"], msg["call_s"]
                    else:
                        row[name] = run[name](seed=r + 1)
                rounds.append(row)
                print(json.dumps({"progress": r, **row}), flush=True)
        finally:
            code = worker.close()
    if code != 0:
        raise WorkerError(f"the Tunix worker exited with status {code}")
    peak_after = matmul_peak(5)
    flops = _fixed_decode_flops(cfg, b, tp, tn)
    sides = ("static", "paged", "tunix_core", "tunix_call")
    median_s = {k: statistics.median(row[k] for row in rounds) for k in sides}
    tps = {k: b * tn / median_s[k] for k in sides}
    ratios = {f"{ours}_over_{t}": tps[ours] / tps[t] for ours in ("static", "paged")
              for t in ("tunix_core", "tunix_call")}
    per_round = {f"{ours}_over_tunix_core": statistics.median(row["tunix_core"] / row[ours]
                                                             for row in rounds)
                 for ours in ("static", "paged")}
    return {"config": "ModelConfig.bench29m()", "params": cfg.num_params, "dtype": "float32",
            "devices": str(jax.devices()), "jax": jax.__version__, "batch": b, "prompt": tp,
            "new_tokens": tn, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
            "eos": "off (jaxgrpo: eos_ids=(); Tunix: eos_tokens=[-1], an id no token has)",
            "paged": dataclasses.asdict(paged), "tunix": ready,
            "warmup_s": {**warm, "tunix_core_plus_call": ready.get("warmup_s")},
            "rounds": rounds, "median_seconds": median_s, "tokens_per_s": tps,
            "ratios": ratios, "per_round_median_ratios": per_round,
            "model_flops_per_call": flops,
            "f32_matmul_peak_flops_before_after": [peak_before, peak_after],
            "flops_fraction_of_peak": {k: flops / median_s[k] / max(peak_before, peak_after)
                                       for k in sides},
            "best_over_tunix_core": max(ratios["static_over_tunix_core"],
                                        ratios["paged_over_tunix_core"]),
            # the machine's 1/5/15-minute load averages (other users' jobs included)
            "loadavg_before_after": [load_before, os.getloadavg()], "cpu_count": os.cpu_count()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--engines", action="store_true",
                    help="compare the static sampler with the paged engine instead")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--mean-len", type=float, default=64.0)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--budget-small", type=int, default=128)
    ap.add_argument("--budget-large", type=int, default=1024)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--steps-per-sync", type=int, default=32)
    ap.add_argument("--mem-prompts", type=int, default=16)
    ap.add_argument("--mem-group", type=int, default=64)
    ap.add_argument("--mem-prompt", type=int, default=512)
    ap.add_argument("--mem-budget", type=int, default=512)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--train-seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)  # --engines: use 1 (slow runs)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--tunix-venv", default=None,
                    help="fixed-length decode side by side with Tunix in this environment")
    ap.add_argument("--tunix-batch", type=int, default=256)
    ap.add_argument("--out", default=None, help="--tunix-venv: also write the JSON here")
    args = ap.parse_args(argv)
    if args.tunix_venv is not None:
        if args.engines:
            raise SystemExit("--tunix-venv and --engines are separate benchmarks: pass one")
        for k in ("tunix_batch", "prompt", "new_tokens", "repeats", "steps_per_sync"):
            if getattr(args, k) < 1:
                raise SystemExit(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
        try:
            python = tunix_python(args.tunix_venv)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        out = tunix_main(args, python)
        text = json.dumps(out, indent=1)
        print(text)
        if args.out:
            pathlib.Path(args.out).write_text(text + "\n")
        return out
    if args.engines:
        if args.requests % args.group:
            ap.error(f"--requests ({args.requests}) must be a multiple of --group ({args.group})")
        return engines_main(args)

    cfg = ModelConfig.bench29m()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    peak = matmul_peak(args.repeats)
    out = {"config": "ModelConfig.bench29m()", "params": cfg.num_params, "dtype": "float32",
           "devices": str(jax.devices()), "f32_matmul_peak_flops": peak,
           "prefill": [], "decode": []}
    for b in args.batches:
        out["prefill"].append(bench_prefill(model, b, args.prompt, args.repeats, peak))
        out["decode"].append(bench_decode(model, b, args.prompt, args.new_tokens, args.repeats,
                                          peak))
        print(json.dumps({"progress": b, "decode": out["decode"][-1]}), flush=True)
    if not args.skip_train:
        out["train_fwd_bwd"] = bench_train(model, args.train_batch, args.train_seq,
                                           args.repeats, peak)
    out["peak_after"] = matmul_peak(args.repeats)  # drift check on a shared machine
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
