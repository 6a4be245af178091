"""The trained policy in the HF format: ``<workdir>/final_model`` after a run, and
``jaxgrpo export --run DIR [--step N] --out DIR``; ``transformers`` loads both with our logits."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgrpo import cli
from jaxgrpo.config import load_config
from jaxgrpo.model import load_hf
from jaxgrpo.tasks import Score
from jaxgrpo.train import loop
from tests.train.conftest import tiny_overrides

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.hf, pytest.mark.slow]  # one short training run (~30 s on 2 cores)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step run with checkpoints at steps 1 and 2: ``(workdir, summary)``. A stand-in
    verifier with random rewards gives the groups a learning signal, so step 2 != step 1."""
    workdir = tmp_path_factory.mktemp("run")
    cfg = load_config(None, tiny_overrides(workdir, **{"train.steps": 2, "checkpoint.every": 1}))
    rng = np.random.default_rng(0)

    def fake_score_many(task, records, completions, **kw):
        return [Score(reward=float(ok), correct=bool(ok), format_ok=True, error=None)
                for ok in rng.random(len(completions)) < 0.5]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "score_many", fake_score_many)
        return workdir, loop.run(cfg, stream=io.StringIO())


def test_final_model_loads_in_transformers_with_the_trained_logits(trained):
    import transformers

    workdir, summary = trained
    final = workdir / "final_model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (final / name).is_file(), name
    ours = load_hf(final)  # our own loader reads the export: its weights ...
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, ours.cfg.vocab_size, jnp.int32)
    # ... are the trained parameters, bit for bit ...
    got = dict(nnx.to_flat_state(nnx.state(ours, nnx.Param)))
    want = dict(nnx.to_flat_state(summary["params"]))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k].get_value()),
                                      np.asarray(want[k].get_value()), err_msg=str(k))
    # ... and through transformers, with the same logits.
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(final)).eval()
    np.testing.assert_allclose(_torch_logits(hf, tokens), np.asarray(ours(tokens)), atol=1e-4,
                               rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(str(final))
    assert tok.eos_token_id is not None


def test_export_command_writes_a_chosen_step(trained, tmp_path, capsys):
    import transformers

    workdir, _ = trained
    latest, first = tmp_path / "latest", tmp_path / "first"
    assert cli.main(["export", "--run", str(workdir), "--out", str(latest)]) == 0
    assert "exported step 2" in capsys.readouterr().out
    # The latest checkpoint is the final model, byte for byte.
    assert ((latest / "model.safetensors").read_bytes()
            == (workdir / "final_model" / "model.safetensors").read_bytes())
    assert cli.main(["export", "--run", str(workdir), "--step", "1", "--out", str(first)]) == 0
    assert "exported step 1" in capsys.readouterr().out
    a, b = load_hf(first), load_hf(latest)
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % a.cfg.vocab_size
    assert not np.allclose(np.asarray(a(tokens)), np.asarray(b(tokens)))  # step 1 != step 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(first)).eval()
    np.testing.assert_allclose(_torch_logits(hf, tokens), np.asarray(a(tokens)), atol=1e-4,
                               rtol=0)


@pytest.mark.parametrize("case", ["no run", "missing step", "out not empty"])
def test_export_refusals_are_one_line_and_write_nothing(trained, tmp_path, capsys, case):
    workdir, _ = trained
    out = tmp_path / "out"
    args = {"no run": ["--run", str(tmp_path / "nope"), "--out", str(out)],
            "missing step": ["--run", str(workdir), "--step", "7", "--out", str(out)],
            "out not empty": ["--run", str(workdir), "--out", str(workdir)]}[case]
    before = sorted(p.name for p in workdir.iterdir())
    assert cli.main(["export", *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("jaxgrpo: error:"), err
    needle = {"no run": "config.yaml", "missing step": "available steps: 1, 2",
              "out not empty": "not an empty directory"}[case]
    assert needle in err[0]
    assert not out.exists()
    assert sorted(p.name for p in workdir.iterdir()) == before
