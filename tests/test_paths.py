"""Run paths: URIs keep their scheme through every helper; local paths behave as before."""

import os
import pathlib

import pytest

from jaxgrpo import paths
from jaxgrpo.config import ConfigError, load_config, save_config

URI = "gs://bucket/x"


def test_a_gs_string_survives_every_helper_unchanged():
    p = paths.as_path(URI)
    assert str(p) == os.fspath(p) == URI
    assert str(p / "checkpoints") == URI + "/checkpoints"
    assert str(paths.as_path(p)) == URI  # an epath.Path passes through
    assert str(p.parent) == "gs://bucket" and p.name == "x"
    assert paths.is_uri(URI) and paths.is_uri(p) and not paths.is_uri("runs/demo")
    # What pathlib does to it (the bug these helpers avoid):
    assert str(pathlib.Path(URI)) == "gs:/bucket/x"


def test_config_keeps_uri_strings_and_validates_them_without_network():
    cfg = load_config(None, [f"train.workdir={URI}", f"checkpoint.dir={URI}/ck",
                             f"logging.dir={URI}/tb"], check_paths=True)
    assert (cfg.train.workdir, cfg.checkpoint.dir, cfg.logging.dir) == (
        URI, URI + "/ck", URI + "/tb")


@pytest.mark.parametrize("key", ["train.workdir", "checkpoint.dir", "logging.dir"])
def test_unknown_uri_scheme_is_refused_naming_the_key(key):
    with pytest.raises(ConfigError, match=rf"'{key}'.*unknown scheme 'nosuch://'"):
        load_config(None, [f"{key}=nosuch://bucket/run"], check_paths=True)
    load_config(None, [f"{key}=nosuch://bucket/run"], check_paths=False)  # no check asked


@pytest.mark.parametrize("key", ["model.path", "model.tokenizer"])
def test_model_uri_is_refused_as_not_local(key):
    extra = ["model.preset=null"] if key == "model.path" else []
    with pytest.raises(ConfigError, match=rf"'{key}' 'gs://bucket/m' is a URI: give a local"):
        load_config(None, [f"{key}=gs://bucket/m", *extra], check_paths=True)


def test_unknown_scheme_names_the_path():
    with pytest.raises(ValueError, match="'memory://a': unknown scheme 'memory://'"):
        paths.as_path("memory://a")


def test_local_dir_is_the_directory_itself_for_a_local_path(tmp_path):
    target = tmp_path / "a" / "b"
    with paths.local_dir(target) as d:
        assert d == target and d.is_dir()
        (d / "f.txt").write_text("x")
    assert (target / "f.txt").read_text() == "x"


def test_local_dir_stages_and_uploads_a_uri(fake_gcs):
    with paths.local_dir("gs://bucket/out/model") as d:
        stage = d
        assert not str(d).startswith(fake_gcs)
        (d / "config.json").write_text("{}")
        (d / "sub").mkdir()
        (d / "sub" / "w.bin").write_bytes(b"\x00\x01")
    assert not stage.exists()
    root = pathlib.Path(fake_gcs) / "bucket" / "out" / "model"
    assert (root / "config.json").read_text() == "{}"
    assert (root / "sub" / "w.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(RuntimeError), paths.local_dir("gs://bucket/failed") as d:
        (d / "partial").write_text("x")
        raise RuntimeError
    assert not (pathlib.Path(fake_gcs) / "bucket" / "failed").exists()


def test_write_text_and_save_config_on_a_uri(fake_gcs, tmp_path):
    cfg = load_config(None, [f"train.workdir={URI}"])
    save_config(cfg, URI + "/config.yaml")
    save_config(cfg, tmp_path / "config.yaml")
    remote = pathlib.Path(fake_gcs) / "bucket" / "x" / "config.yaml"
    assert remote.read_bytes() == (tmp_path / "config.yaml").read_bytes()
    assert load_config(str(remote)).train.workdir == URI
    assert not (tmp_path / "config.yaml.tmp").exists()
