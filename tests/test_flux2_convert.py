"""mmdit-convert for FLUX.2 transformers, both ways and bit-exact: a BFL file (klein style, float32 and
bfloat16) -> Orbax -> BFL file, and a diffusers component folder (dev style) -> Orbax -> diffusers
folder that diffusers' own from_pretrained reads back."""
import json

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from flux2_oracle import tiny_flux2
from mmdit_jax.conversion.export import export
from mmdit_jax.conversion.to_orbax import convert
from mmdit_jax.flux2 import weights
from mmdit_jax.io import rules
from mmdit_jax.io.safetensors_io import TensorFile, save_file


def _bfl_tensors(ref, tmp):
    import mmdit_jax as mj

    ref.save_pretrained(tmp)
    model = mj.load_transformer(tmp)
    return dict(rules.export_params(weights.plan(model.config), jax.tree.map(np.asarray, model.params), "original"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bfl_file_orbax_bfl_file_is_bit_exact(tmp_path, dtype):
    tensors = _bfl_tensors(tiny_flux2(False, seed=6), tmp_path / "diffusers")
    if dtype == "bfloat16":
        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "klein.safetensors"))
    convert(str(tmp_path / "klein.safetensors"), str(tmp_path / "orbax"), dtype)
    index = json.loads((tmp_path / "orbax" / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline"
    assert index["transformer"] == ["diffusers", "Flux2Transformer2DModel"] and index["vae"] == [None, None]
    export(str(tmp_path / "orbax"), str(tmp_path / "orig"), "original")
    a, b = TensorFile(str(tmp_path / "klein.safetensors")), TensorFile(str(tmp_path / "orig" / "flux2.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x.view(np.uint8), y.view(np.uint8)), k


def test_diffusers_folder_orbax_diffusers_is_bit_exact(tmp_path):
    from diffusers import Flux2Transformer2DModel

    ref = tiny_flux2(True, seed=7)
    ref.save_pretrained(tmp_path / "component")
    convert(str(tmp_path / "component"), str(tmp_path / "orbax"))
    assert json.loads((tmp_path / "orbax" / "model_index.json").read_text())["_class_name"] == "Flux2Pipeline"
    export(str(tmp_path / "orbax"), str(tmp_path / "back"), "diffusers", max_shard_bytes=60_000)
    back = Flux2Transformer2DModel.from_pretrained(str(tmp_path / "back" / "transformer"))
    sa, sb = ref.state_dict(), back.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
