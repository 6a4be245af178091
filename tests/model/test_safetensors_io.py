"""The safetensors writer (the safetensors package) and the memory-mapped reader agree."""

import ml_dtypes
import numpy as np
import pytest
import safetensors

from jaxgrpo.model.hf import _load_tensor, _read_header, write_safetensors


def test_write_then_read_back_with_both_readers(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
        "b.bias": rng.normal(size=(7,)).astype(np.float32),
        "c.ids": np.arange(4, dtype=np.int64).reshape(2, 2),
        "d.half": rng.normal(size=(2, 3, 2)).astype(np.float16),
    }
    file = tmp_path / "model.safetensors"
    write_safetensors(file, tensors, metadata={"format": "pt", "note": "x"})
    refs = _read_header(file)
    assert set(refs) == set(tensors)
    with safetensors.safe_open(str(file), "numpy") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
        for k, want in tensors.items():
            ours, theirs = _load_tensor(refs[k]), f.get_tensor(k)
            assert ours.dtype == theirs.dtype == want.dtype and ours.shape == want.shape
            np.testing.assert_array_equal(np.asarray(ours).view(np.uint8),
                                          want.view(np.uint8))
            np.testing.assert_array_equal(theirs.view(np.uint8), want.view(np.uint8))
    with pytest.raises(TypeError, match="tensor 'e': cannot write dtype uint8"):
        write_safetensors(tmp_path / "bad.safetensors", {"e": np.zeros(2, np.uint8)})
