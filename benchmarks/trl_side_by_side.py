"""One GRPO step of jaxgrpo against TRL's ``GRPOTrainer`` on the identical config, in one run.

Usage (from the repository root; TRL and torch live in their own virtual environment):
    python -m venv trl-venv && trl-venv/bin/pip install torch==2.13.0 trl==1.16.0
    PYTHONPATH=$PWD python benchmarks/trl_side_by_side.py --trl-python trl-venv/bin/python \
        [--prompts 4 --group 4 --prompt-len 32 --completion-len 64 --steps 3] [--out FILE]

Both sides train the same model shape, the 29.4M-parameter Qwen2 config
(``ModelConfig.bench29m()`` here, ``Qwen2ForCausalLM`` of the same ``Qwen2Config`` in TRL:
q/k/v biases, RoPE theta 1e6, tied embeddings), in float32 on the CPU, from random weights.
One step: ``prompts`` prompts of ``prompt-len`` random tokens, ``group`` completions each of
exactly ``completion-len`` sampled tokens (temperature 1, no top-k/top-p; EOS cannot end them
early), a random reward per completion, group-normalised advantages, and one AdamW update
(lr 1e-6, no weight decay, gradient clipping at norm 1) of the token-mean clipped loss
(epsilon 0.2, no KL: TRL's ``loss_type="dapo"``, ``beta=0``; one iteration and one minibatch,
so neither side runs an old-log-prob forward). TRL runs in a subprocess
(``--worker trl``, the same file under ``--trl-python``) after jaxgrpo; each side times
``steps`` steps after one warm-up step (jaxgrpo compiles there) and reports medians. The JSON
holds both and ``trl_over_jaxgrpo``: TRL's step time over jaxgrpo's (above 1: jaxgrpo is
faster). The machine's other load shows in both; rerun and compare ratios, not times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VOCAB = 8192


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (P)")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt (G)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    ap.add_argument("--trl-python", default=None,
                    help="python of the environment with torch and trl (omit: jaxgrpo only)")
    ap.add_argument("--worker", choices=["trl"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    for k in ("prompts", "group", "prompt_len", "completion_len", "steps", "threads"):
        if getattr(args, k) < 1:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.group < 2:
        raise SystemExit("--group must be >= 2 (group-relative advantages)")
    return args


def _summary(gen, upd, step):
    return {"step_s": statistics.median(step), "generate_s": statistics.median(gen),
            "update_s": statistics.median(upd), "step_s_all": step}


def run_jaxgrpo(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from jaxgrpo.core import advantages as core_adv
    from jaxgrpo.model import ModelConfig, Transformer
    from jaxgrpo.rollout import generate_functional
    from jaxgrpo.train import batch as batch_lib
    from jaxgrpo.train.state import init_train_state, split_model
    from jaxgrpo.train.step import StepConfig, make_train_step

    cfg = ModelConfig.bench29m()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef = nnx.graphdef(model)
    parts, params = split_model(model)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, weight_decay=0.0))
    step_cfg = StepConfig(agg="token_mean", clip_low=0.2, clip_high=0.2)
    assert not step_cfg.old_logp_forward
    train_step = make_train_step(parts, tx, step_cfg)
    state = init_train_state(params, tx, 0, with_ref=False)
    rng = np.random.default_rng(0)
    p, g, tp, tc = args.prompts, args.group, args.prompt_len, args.completion_len
    gen_t, upd_t, step_t = [], [], []
    for i in range(args.steps + 1):
        ptoks = rng.integers(2, VOCAB, (p, tp)).astype(np.int32)
        pmask = np.ones((p, tp), bool)
        t0 = time.perf_counter()
        out = jax.device_get(generate_functional(
            graphdef, nnx.merge_state(state.params, parts.rest), ptoks, pmask,
            jax.random.key(i), num_samples=g, max_new_tokens=tc, temperature=1.0,
            eos_ids=(), pad_id=0, buckets=(tp,)))
        t1 = time.perf_counter()
        rewards = rng.random((p, g)).astype(np.float32)
        mask = np.asarray(out.mask, bool)
        adv = np.asarray(core_adv.group_relative(jnp.asarray(rewards), jnp.ones((p, g), bool),
                                                 baseline="mean", scale="group"))
        tb = batch_lib.assemble(ptoks, pmask, np.asarray(out.tokens), mask, adv,
                                old_logp=np.asarray(out.logprobs), pad_id=0)
        state, m = train_step(state, jax.tree.map(jnp.asarray, tb))
        jax.block_until_ready(m)
        t2 = time.perf_counter()
        assert int(mask.sum()) == p * g * tc, "a completion ended early"
        if i:  # step 0 compiles
            gen_t.append(t1 - t0)
            upd_t.append(t2 - t1)
            step_t.append(t2 - t0)
    return {"params": cfg.num_params, "jax": jax.__version__, **_summary(gen_t, upd_t, step_t)}


def run_trl(args) -> dict:
    import tempfile

    import datasets
    import numpy as np
    import tokenizers
    import torch
    import transformers
    import trl

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="t0", eos_token="t1", unk_token="t0")
    hf = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
        bos_token_id=None)
    model = transformers.Qwen2ForCausalLM(hf).float()
    n_params = sum(x.numel() for x in model.parameters())
    rng = np.random.default_rng(0)
    p, g, tp, tc = args.prompts, args.group, args.prompt_len, args.completion_len
    prompts = [" ".join(f"t{x}" for x in rng.integers(2, VOCAB, tp))
               for _ in range(p * (args.steps + 1))]
    ds = datasets.Dataset.from_dict({"prompt": prompts})

    def reward(completions, **_):
        return rng.random(len(completions)).tolist()

    class Timer(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        cfg = trl.GRPOConfig(
            output_dir=out, per_device_train_batch_size=p * g, gradient_accumulation_steps=1,
            num_generations=g, max_completion_length=tc,
            generation_kwargs={"min_new_tokens": tc}, temperature=1.0, top_k=0, top_p=1.0,
            learning_rate=1e-6, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
            warmup_steps=0, beta=0.0, epsilon=0.2, loss_type="dapo", num_iterations=1,
            max_steps=args.steps + 1, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
            save_strategy="no", shuffle_dataset=False, seed=0, dataloader_num_workers=0,
        )
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds,
                                  processing_class=tokenizer, callbacks=[timer])
        trainer.train()
        logs = [r for r in trainer.state.log_history if "completions/mean_length" in r]
    lengths = [r["completions/mean_length"] for r in logs]
    if any(abs(x - tc) > 1e-6 for x in lengths):
        raise RuntimeError(f"TRL completions are not {tc} tokens long: {lengths}")
    step_t = timer.times[1:]
    return {"params": n_params, "trl": trl.__version__, "torch": torch.__version__,
            "threads": args.threads, "step_s": statistics.median(step_t), "step_s_all": step_t}


def main(argv=None):
    args = _args(argv)
    if args.worker == "trl":
        print(json.dumps(run_trl(args)))
        return
    shape = {k: getattr(args, k) for k in ("prompts", "group", "prompt_len", "completion_len",
                                           "steps")}
    load_before = os.getloadavg()
    result = {"config": "bench29m (Qwen2 shape), float32, CPU", **shape,
              "jaxgrpo": run_jaxgrpo(args)}
    if args.trl_python:
        cmd = [args.trl_python, os.path.abspath(__file__), "--worker", "trl"]
        for k, v in {**shape, "threads": args.threads}.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"the TRL worker failed (exit {proc.returncode})")
        result["trl"] = json.loads(proc.stdout.strip().splitlines()[-1])
        if result["trl"]["params"] != result["jaxgrpo"]["params"]:
            raise SystemExit(f"parameter counts differ: TRL {result['trl']['params']}, "
                             f"jaxgrpo {result['jaxgrpo']['params']}")
        result["trl_over_jaxgrpo"] = result["trl"]["step_s"] / result["jaxgrpo"]["step_s"]
    # the machine's 1/5/15-minute load averages, before and after (other users' jobs included)
    result["loadavg_before_after"] = [load_before, os.getloadavg()]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
