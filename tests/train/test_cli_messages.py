"""The command line's refusals and messages, through the real ``jaxgrpo`` command.

A refused command writes nothing (the old run directory stays byte-identical), ``--resume``
with nothing to resume says so, flags are never abbreviated, impossible batch sizes are
refused at once by the memory check, broken model files are named, ``score`` fails on input
that is not JSONL, ``eval --run`` uses the run's own config and names the step, and an
internal error keeps its traceback with a line saying it is a bug.
"""

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

TINY = ["train.steps=2", "train.eval_every=0", "model.sft.steps=0", "tasks.prompts_per_step=4",
        "tasks.eval_prompts=2", "rollout.group_size=2", "rollout.max_new_tokens=6",
        "rollout.eval_samples=2", "rollout.prompt_buckets=[24]", "checkpoint.every=2",
        "checkpoint.asynchronous=false", "logging.progress=false", "mesh.devices=1"]


def _cli(*args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "jaxgrpo.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _python(code: str, *, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


# The trainer's timed progress line ("[jaxgrpo] <what is running> ... (0:02 since start)"),
# which a slow start prints before the error: not part of the error.
PROGRESS = re.compile(r"^\[jaxgrpo\] .* \.\.\. \(\d+:\d\d since start\)$")


def _lines(text: str) -> list[str]:
    # libtpu, when installed, may print its own start-up warnings: not jaxgrpo's output.
    noise = ("WARNING: Logging before InitGoogle", "TPU", "=== Source Location", "learning/",
             "E0000 ", "W0000 ")
    return [ln for ln in text.splitlines()
            if ln.strip() and not ln.startswith(noise) and not PROGRESS.match(ln)]


def _one_line_error(out, *needles):
    assert out.returncode == 2, out.stderr
    lines = _lines(out.stderr)
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("jaxgrpo: error:"), lines[0]
    assert "Traceback" not in out.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _snapshot(directory: pathlib.Path) -> dict[str, str]:
    """Every file and directory under ``directory``: path -> sha256 (or 'dir'), and mtimes."""
    out = {}
    for p in sorted(directory.rglob("*")):
        rel = str(p.relative_to(directory))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        out[rel + "@mtime"] = str(p.stat().st_mtime_ns)
    return out


def _old_run(tmp_path) -> pathlib.Path:
    """A run directory as `jaxgrpo train` leaves it: config, logs and a committed checkpoint
    (the refusal reads only the checkpoint directory's commit markers)."""
    run = tmp_path / "old"
    (run / "checkpoints" / "2" / "state").mkdir(parents=True)
    (run / "checkpoints" / "2" / "commit_success.txt").write_text("ok")
    (run / "checkpoints" / "2" / "state" / "blob").write_bytes(b"\0\1\2")
    (run / "config.yaml").write_text("# the old run's config\noptim:\n  lr: 0.5\n")
    (run / "hparams.json").write_text('{"optim.lr": 0.5}')
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    return run


def test_refused_train_leaves_the_old_run_byte_identical(tmp_path):
    run = _old_run(tmp_path)
    before = _snapshot(run)
    out = _cli("train", *TINY, f"train.workdir={run}", cwd=tmp_path)
    _one_line_error(out, "already holds checkpoints (step 2)", "--resume")
    assert _snapshot(run) == before


def test_resume_with_nothing_to_resume_is_an_error(tmp_path):
    fresh = tmp_path / "fresh"
    out = _cli("train", *TINY, f"train.workdir={fresh}", "--resume", cwd=tmp_path)
    _one_line_error(out, "--resume", "nothing to resume")
    assert not fresh.exists()
    # A directory with a config but no committed checkpoint (a save killed mid-write).
    half = tmp_path / "half"
    (half / "checkpoints" / "2.orbax-checkpoint-tmp-1").mkdir(parents=True)
    (half / "config.yaml").write_text("# x\n")
    before = _snapshot(half)
    out = _cli("train", *TINY, f"train.workdir={half}", "--resume", cwd=tmp_path)
    _one_line_error(out, "nothing to resume")
    assert _snapshot(half) == before


@pytest.mark.parametrize("where", ["before the config", "between config and overrides"])
def test_resume_flag_may_come_before_the_config(where, tmp_path):
    """`--resume CONFIG` is the flag then the config (argparse alone took CONFIG as its value,
    an invalid choice), and `CONFIG --resume key=value` keeps the overrides."""
    fresh = tmp_path / "fresh"
    config = str(ROOT / "configs" / "demo.yaml")
    rest = [*TINY, f"train.workdir={fresh}"]
    argv = (["--resume", config, *rest] if where == "before the config"
            else [config, "--resume", *rest])
    out = _cli("train", *argv, cwd=tmp_path)
    _one_line_error(out, "--resume", "nothing to resume", str(fresh))
    assert not fresh.exists()


@pytest.mark.parametrize("argv,config_args,resume", [
    (["--resume", "c.yaml", "a=1"], ["c.yaml", "a=1"], True),
    (["c.yaml", "--resume", "a=1", "b=2"], ["c.yaml", "a=1", "b=2"], True),
    (["c.yaml", "a=1", "--resume"], ["c.yaml", "a=1"], True),
    (["--resume", "auto", "c.yaml", "a=1"], ["c.yaml", "a=1"], "auto"),
    (["c.yaml", "--resume", "auto", "a=1"], ["c.yaml", "a=1"], "auto"),
    (["c.yaml", "a=1", "--resume", "auto"], ["c.yaml", "a=1"], "auto"),
    (["--resume=auto", "c.yaml"], ["c.yaml"], "auto"),
    (["--resume", "a=1"], ["a=1"], True),
    (["--resume"], [], True),
    (["auto"], ["auto"], False),
    (["c.yaml"], ["c.yaml"], False),
])
def test_resume_parses_wherever_it_stands(argv, config_args, resume):
    """Every spelling of `--resume [auto]`, at any position, as `jaxgrpo train` parses it."""
    from jaxgrpo import cli
    from jaxgrpo.train import cli_train

    full = ["train", *argv]
    parser, module = cli.build_parser(full)
    args = parser.parse_args(["train", *cli_train.prepare_argv(argv)])
    assert module is cli_train
    assert args.config_args == config_args
    assert args.resume == resume


def test_resume_with_another_value_is_refused(tmp_path):
    out = _cli("train", "--resume=latest", "configs/demo.yaml", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "invalid choice: 'latest'" in out.stderr, out.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [
    ["train", "--resum"],
    ["eval", "--ru", "x"],
    ["score", "--task", "sort", "--inp", "x.jsonl"],
    ["sft", "--out", "x"],
    ["tasks", "sample", "addition", "--se", "1"],
])
def test_flags_are_never_abbreviated(argv, tmp_path):
    out = _cli(*argv, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "unrecognized arguments" in out.stderr or "required" in out.stderr, out.stderr
    assert not any(tmp_path.iterdir())


def test_argparse_abbreviations_are_off_in_every_parser():
    """Every ArgumentParser in the package and the benchmarks is built with allow_abbrev=False
    (the sub-parsers too)."""
    import ast

    files = [*(ROOT / "jaxgrpo").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    seen = 0
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(
                    node.func, "id", None)) in ("ArgumentParser", "add_parser"):
                seen += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert "allow_abbrev" in kw and kw["allow_abbrev"].value is False, (
                    f"{f.relative_to(ROOT)}:{node.lineno}")
    assert seen >= 10


@pytest.mark.parametrize("override,needles", [
    ("tasks.prompts_per_step=1000000000", ("tasks.prompts_per_step=1000000000", "GB")),
    ("rollout.group_size=100000", ("rollout.group_size=100000", "GB")),
    ("tasks.eval_prompts=100000000", ("tasks.eval_prompts=100000000", "GB")),
])
def test_batch_sizes_that_cannot_fit_are_refused_at_once(override, needles, tmp_path):
    run = tmp_path / "run"
    out = _cli("train", override, "mesh.devices=1", f"train.workdir={run}", cwd=tmp_path,
               timeout=120)
    _one_line_error(out, *needles, "more than the")
    assert not run.exists()


def _hf_dir(tmp_path) -> pathlib.Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64,
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu"}))
    return d


def test_model_path_file_corrupt_weights_and_broken_config_are_named(tmp_path):
    d = _hf_dir(tmp_path)
    run = tmp_path / "run"
    common = [*TINY, f"train.workdir={run}"]
    # A file, not a directory.
    out = _cli("train", f"model.path={d / 'config.json'}", *common, cwd=tmp_path)
    _one_line_error(out, "is a file, not a directory", str(d))
    # A safetensors file whose header length is garbage (it was a 26-line MemoryError).
    st = d / "model.safetensors"
    st.write_bytes((10**15).to_bytes(8, "little") + b"{}")
    out = _cli("train", f"model.path={d}", *common, cwd=tmp_path)
    _one_line_error(out, str(st), "not a valid safetensors file", "header length")
    # A truncated file.
    st.write_bytes(b"\1\2")
    out = _cli("train", f"model.path={d}", *common, cwd=tmp_path)
    _one_line_error(out, str(st), "fewer than the 8-byte header")
    # A broken config.json.
    (d / "config.json").write_text('{"model_type": "llama", ')
    out = _cli("train", f"model.path={d}", *common, cwd=tmp_path)
    _one_line_error(out, str(d / "config.json"), "not valid JSON")
    assert not run.exists()


def test_score_fails_on_input_that_is_not_jsonl(tmp_path):
    bad = tmp_path / "in.txt"
    bad.write_text("this is not json\nnor this\n")
    out = _cli("score", "--task", "sort", "--input", str(bad), "--workers", "0", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "no valid input line" in out.stderr and str(bad) in out.stderr
    assert out.stdout == ""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = _cli("score", "--task", "sort", "--input", str(empty), "--workers", "0", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    # A mixed file still scores every line, exits 0 and says how many lines were bad.
    from jaxgrpo.tasks import get_task

    rec = get_task("sort@1").dataset()[0]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"example": rec, "completion": rec["answer"]}) + "\nnot json\n")
    out = _cli("score", "--task", "sort@1", "--input", str(mixed), "--workers", "0",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [json.loads(x)["correct"] for x in out.stdout.splitlines()] == [True, False]
    assert "1 of 2 input lines are not valid input" in out.stderr


def test_internal_errors_keep_their_traceback_and_say_they_are_bugs(tmp_path):
    """A ValueError from inside the trainer is not shown as a config error."""
    code = (
        "import sys\n"
        "import jaxgrpo.train.loop as loop\n"
        "def broken(cfg, **kw):\n"
        "    raise ValueError('shapes (3,) and (4,) do not broadcast')\n"
        "loop.run = broken\n"
        "from jaxgrpo.cli import main\n"
        f"sys.exit(main(['train', 'train.workdir={tmp_path / 'run'}']))\n"
    )
    out = _python(code, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "Traceback (most recent call last)" in out.stderr
    assert "ValueError: shapes (3,) and (4,) do not broadcast" in out.stderr
    assert "this is a bug in jaxgrpo" in _lines(out.stderr)[-1]


def test_a_missing_extra_is_one_line_with_the_install_hint(tmp_path):
    """reasoning-gym absent (as after a plain `pip install jaxgrpo`): the rg tasks say which
    extra to install, in one line, before anything is written."""
    code = (
        "import sys\n"
        "sys.modules['reasoning_gym'] = None  # `import reasoning_gym` now raises ImportError\n"
        "from jaxgrpo.cli import main\n"
        "sys.exit(main(['train', 'tasks.mixture=[{name: rg_countdown, level: 1}]', "
        f"'mesh.devices=1', 'train.workdir={tmp_path / 'run'}']))\n"
    )
    out = _python(code, cwd=tmp_path)
    _one_line_error(out, "rg_countdown", "pip install 'jaxgrpo[tasks]'")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_real_run_refusal_eval_run_and_round_cap_warning(tmp_path):
    """One real (tiny) run: every dynamic-sampling step hits its round cap with the untrained
    policy (a warning with the padded count); a refused second `train` leaves the real run
    directory byte-identical; `eval --run DIR` alone (no config) evaluates its checkpoint with
    the run's own config and names the step."""
    run = tmp_path / "run"
    dapo = ["algo.name=dapo", "algo.sampling.enabled=true", "algo.sampling.max_rounds=1"]
    out = _cli("train", *TINY, *dapo, f"train.workdir={run}", cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    warns = [ln for ln in _lines(out.stderr) if "round cap" in ln]
    assert len(warns) == 2, out.stderr
    assert "warning: step 1:" in warns[0] and "max_rounds=1" in warns[0]
    assert "4 of 4 groups in the batch are padding" in warns[0]
    assert (run / "checkpoints" / "2" / "commit_success.txt").is_file()
    before = _snapshot(run)
    out = _cli("train", *TINY, *dapo, f"train.workdir={run}", cwd=tmp_path)
    _one_line_error(out, "already holds checkpoints (step 2)")
    assert _snapshot(run) == before
    out = _cli("eval", "--run", str(run), cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    head = out.stdout.splitlines()[0]
    assert head.startswith(f"evaluated: checkpoint step 2 of {run}"), out.stdout
    assert "2 prompts x 2 samples" in head  # the run's config, not the built-in demo's
    assert out.stdout.splitlines()[-1].startswith("mean")
