"""``jaxgrpo tasks list|sample`` and ``jaxgrpo score``, in-process through the dispatcher."""

import json

import pytest

from jaxgrpo.cli import main
from jaxgrpo.tasks import get_task, list_tasks
from jaxgrpo.tasks.cli import parse_options


def test_tasks_list(capsys):
    assert main(["tasks", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [n for n, _ in list_tasks()]
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in lines)


def test_tasks_sample_is_the_dataset(capsys):
    assert main(["tasks", "sample", "countdown@2", "-n", "4", "--seed", "3"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert recs == get_task("countdown@2").dataset("train", seed=3)[:4]
    assert main(["tasks", "sample", "addition", "--level", "3", "-n", "1", "--split", "eval"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec == get_task("addition@3").dataset("eval")[0]


def test_tasks_sample_errors(capsys):
    assert main(["tasks", "sample", "nope", "-n", "1"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_score_roundtrip_to_output_file(tmp_path, capsys):
    task = get_task("sort@1")
    ds = task.dataset()
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"example": ds[i], "completion": ds[i]["answer"] if i % 2 else "zz"}
             for i in range(6)]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")
    assert main(["score", "--task", "sort", "--input", str(inp), "--output", str(out),
                 "--workers", "0"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got == [{"reward": float(i % 2), "correct": bool(i % 2), "error": None}
                   for i in range(6)]
    assert main(["score", "--task", "sort", "--input", str(tmp_path / "none.jsonl")]) == 2
    assert "jaxgrpo score" in capsys.readouterr().err


def test_score_structured_adds_blocks(tmp_path, capsys):
    rec = get_task("addition").dataset()[0]
    comp = (f"<reasoning></reasoning><answer>{rec['answer']}</answer>"
            "<analysis></analysis><confidence>0.5</confidence>")
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"example": rec, "completion": comp}) + "\n")
    assert main(["score", "--task", "confidence", "--opt", "base=addition@1", "--opt",
                 "conf_reward=log", "--input", str(inp), "--workers", "0"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["correct"] and got["confidence"] == 0.5
    assert got["blocks"] == pytest.approx([1.0, -0.6931471805599453])


def test_parse_options():
    assert parse_options(["level=2", "base=addition@1", "eps=0.01"]) == {
        "level": 2, "base": "addition@1", "eps": 0.01}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["oops"])
