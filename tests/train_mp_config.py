"""--config file for the multi-process tests: the tiny SD3 network from a base pipeline that the lead
process writes into the empty workdir (base maker "tiny_sd3", slow on purpose: the other process must
wait for it), trained on FakeTrainData (a stream per data group)."""
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_fake  # noqa: E402
from mmdit_jax.training.config import BaseConfig, ModelConfig  # noqa: E402
from mmdit_jax.training.hooks import register_base_maker  # noqa: E402

MAKER_SECONDS = 2.0


def tiny_sd3_base(folder, cfg, options, seed):
    import mmdit_jax as mj
    from mmdit_jax.toy.components import write_transformer

    time.sleep(MAKER_SECONDS)
    tmp = folder + ".partial"
    # safetensors, not Orbax: an Orbax save is collective, and only the lead process writes the base
    write_transformer(os.path.join(tmp, "transformer"), mj.MMDiTConfig.from_diffusers(train_fake.TINY_SD3), seed)
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]},
                  f)
    os.replace(tmp, folder)


register_base_maker("tiny_sd3", tiny_sd3_base)


def get_config():
    cfg = train_fake.tiny_config(batch_size=4, max_steps=6)
    return cfg.replace(model=ModelConfig(compute_dtype="float32"), base=BaseConfig(maker="tiny_sd3", seed=3),
                       checkpoint=dataclasses.replace(cfg.checkpoint, every=3, keep=3, async_save=False),
                       log=dataclasses.replace(cfg.log, val_every=0))
