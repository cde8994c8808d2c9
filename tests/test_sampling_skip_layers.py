"""Skip-layer guidance needs the SD3 network to bypass chosen blocks exactly as diffusers' `skip_layers`."""
import numpy as np
import pytest
import torch

import mmdit_jax as mj
from conftest import max_rel_err
from sd3_oracle import inputs, tiny_config, tiny_model


@pytest.mark.parametrize("skip", [(1,), (0, 2, 3)])
def test_skip_layers_match_diffusers(tmp_path, skip):
    # layers 1-2 dual (one stack of two): a skip inside a stack, across stacks, and the pre-only last block
    kw = dict(num_layers=4, qk_norm="rms_norm", dual_attention_layers=(1, 2))
    model = tiny_model(seed=3, **kw)
    model.save_pretrained(str(tmp_path))
    x = inputs(tiny_config(**kw), batch=2, h=8, w=6)
    with torch.no_grad():
        ref = model(hidden_states=torch.tensor(x["latents"]).permute(0, 3, 1, 2),
                    encoder_hidden_states=torch.tensor(x["context"]),
                    pooled_projections=torch.tensor(x["pooled"]), timestep=torch.tensor(x["sigma"]) * 1000,
                    skip_layers=list(skip)).sample.permute(0, 2, 3, 1).numpy()
    tm = mj.load_transformer(str(tmp_path))
    out = tm(x["latents"], x["sigma"], x["context"], x["pooled"], skip_layers=skip)
    assert max_rel_err(out, ref) < 1e-5
    full = tm(x["latents"], x["sigma"], x["context"], x["pooled"])
    assert max_rel_err(full, ref) > 1e-2  # the skip changed the output


def test_skip_layers_out_of_range(tmp_path):
    tm = mj.Transformer.init(mj.MMDiTConfig(num_layers=2, num_heads=2, head_dim=8, context_dim=8,
                                            pooled_dim=4, pos_embed_max_size=4))
    x = np.zeros((1, 4, 4, 16), np.float32)
    with pytest.raises(mj.MMDiTError, match="skip_layers"):
        tm(x, np.ones(1, np.float32), np.zeros((1, 3, 8), np.float32), np.zeros((1, 4), np.float32),
           skip_layers=(2,))
