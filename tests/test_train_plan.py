"""`mmdit-train --plan` on 8 virtual CPU devices: the per-device bytes it prints for parameters, optimizer
state and EMA are those of the state really built in its shardings (summed here from the devices' own
shards), and planning allocates nothing the size of the state."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import contextlib, io, json, sys
import jax
from mmdit_jax.cli import train as cli

argv = ["mmdit-train", "--config=" + sys.argv[1], "--plan", "--mesh_fsdp=4", "--mesh_tensor=2",
        "--set=data.resolution=64"]
cli.FLAGS(argv)
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        cli.main(argv[:1])
    except SystemExit as e:
        code = e.code
live = sum(x.nbytes for x in jax.live_arrays())

import mmdit_jax as mj
from mmdit_jax.sharding import make_mesh
from mmdit_jax.training.optim import make_optimizer
from mmdit_jax.training.state import create_state

cfg = cli.build_config()
model = mj.Transformer(mj.MMDiTConfig.from_diffusers(cfg.model.diffusers_config), None)
tx = make_optimizer(cfg.optim, cfg.max_steps, model.trainable_mask())
state, _ = create_state(model, tx, make_mesh({"fsdp": 4, "tensor": 2}), 0, True)

def on_device(tree):
    per = {}
    for x in jax.tree.leaves(tree):
        for s in x.addressable_shards:
            per[s.device.id] = per.get(s.device.id, 0) + s.data.nbytes
    return max(per.values()), len(per)

real = dict(params=on_device(state.params), optimizer=on_device((state.opt_state, state.step, state.rng)),
            ema=on_device(state.ema), total=sum(x.nbytes for x in jax.tree.leaves(state)))

# LoRA: the frozen bfloat16 base as planned (not compiled) against the base really placed
from mmdit_jax.lora import LoraConfig
from mmdit_jax.training.config import LoraTrainConfig
from mmdit_jax.training.modes import TrainMode
from mmdit_jax.training.plan import plan

lcfg = cfg.replace(lora=LoraTrainConfig(enabled=True, adapter=LoraConfig(rank=2), base_dtype="bfloat16"))
planned = plan(lcfg, model.config, compile_step=False)
mode = TrainMode(lcfg, model.config)
base = mj.Transformer.init(model.config)
frozen, _ = mode.frozen(base.params, None, model, make_mesh({"fsdp": 4, "tensor": 2}))
lora = dict(planned=planned["frozen"], real=on_device(frozen))
print(json.dumps(dict(code=code, text=buf.getvalue(), live=live, real=real, lora=lora)))
"""


def test_plan_prints_the_bytes_of_the_really_built_sharded_state(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "tests"))
    res = subprocess.run([sys.executable, "-c", SCRIPT, os.path.join(ROOT, "tests", "train_fake_config.py")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["code"] == 0, got["text"]
    text = got["text"]
    printed = {name: int(re.search(rf"^  {label}\s+([\d,]+) B", text, re.M).group(1).replace(",", ""))
               for name, label in (("params", "parameters"), ("optimizer", "optimizer state"), ("ema", "EMA"),
                                   ("temporaries", "temporaries"))}
    for name in ("params", "optimizer", "ema"):
        nbytes, devices = got["real"][name]
        assert devices == 8
        assert printed[name] == nbytes, (name, printed[name], nbytes)
    # sharded, not replicated: each device holds well under the whole parameter tree
    assert printed["params"] < got["real"]["total"] / 8
    assert printed["temporaries"] > 0
    assert "mesh data=1 fsdp=4 tensor=2 sequence=1 over 8 cpu devices" in text
    assert got["lora"]["planned"] == got["lora"]["real"][0] > 0  # the frozen base, bfloat16
    # planning built no state: what is alive afterwards is far below one copy of it
    assert got["live"] < got["real"]["total"] / 20, (got["live"], got["real"]["total"])
