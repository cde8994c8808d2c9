"""The toy world's trainer hooks: base makers "toy" (SD3 layout) and "toy-flux" (FLUX layout), the "toy"
data kind (the procedural dataset, encoded on the fly) and the "toy" evaluation (held-out prompts sampled
through mj.Pipeline from the workdir, scored by the checker).

Imported by mmdit_jax.plugins on the first registry lookup; registering is its only side effect.
"""
from __future__ import annotations

import dataclasses
import sys

from mmdit_jax.data.pipeline import register_source
from mmdit_jax.errors import MMDiTError
from mmdit_jax.families import family_of_config
from mmdit_jax.io import paths
from mmdit_jax.training import hooks

EVAL_DIR = "eval"


def _maker(variant: str):
    def make(folder, cfg, options, seed):
        from mmdit_jax.toy.components import ToyConfig, write_toy_pipeline

        names = {f.name for f in dataclasses.fields(ToyConfig)} - {"variant", "resolution", "max_sequence_length"}
        unknown = sorted(set(options) - names)
        if unknown:
            raise MMDiTError(f"--set=base.options: unknown toy settings {unknown}; known: {sorted(names)}")
        # the data config decides image size and T5 length; the pipeline records them as its sampling
        # defaults (model_index.json) so sampling from the workdir uses the same ones
        toy = ToyConfig(variant=variant, resolution=cfg.data.resolution,
                        max_sequence_length=cfg.data.max_sequence_length or ToyConfig.max_sequence_length,
                        **options)
        write_toy_pipeline(folder, config=toy, seed=seed)

    return make


def toy_source(resolution: int, seed: int):
    """The procedural toy dataset (grain random-access source of {image uint8 (R, R, 3), caption})."""
    from mmdit_jax.toy.dataset import ToyShapes

    return ToyShapes(resolution=resolution, seed=seed)


def evaluate_toy(cfg, workdir: str, out=sys.stdout) -> dict:
    """Samples every held-out prompt (up to eval.max_prompts) for each of eval.seeds with the trained
    (EMA) weights, exactly as `mmdit-sample --model=WORKDIR` would; writes WORKDIR/eval/{grid.png,
    scores.json, loss.png} and prints the scores."""
    import mmdit_jax as mj
    from mmdit_jax.toy.dataset import held_out_specs
    from mmdit_jax.toy.evaluate import evaluate, plot_loss_curve
    from mmdit_jax.training.metrics import read_jsonl

    ev = cfg.eval
    pipe = mj.Pipeline.from_pretrained(workdir)
    specs = held_out_specs()
    if ev.max_prompts:
        specs = specs[:ev.max_prompts]
    if family_of_config(pipe.transformer.config).sampling.guidance_scale_is_cfg:
        kw = dict(guidance_scale=ev.guidance)
    else:  # FLUX layout without a guidance embedder: true CFG against the empty caption, as trained
        kw = dict(negative_prompt="", true_cfg_scale=ev.guidance)

    def sample_fn(prompts, seed):
        return pipe(prompts, seed=seed, num_inference_steps=ev.steps, output_type="np", **kw)

    out_dir = paths.join(workdir, EVAL_DIR)
    paths.makedirs(out_dir)
    scores = evaluate(sample_fn, specs, out_dir, seeds=tuple(ev.seeds), verbose=False)
    metrics = paths.join(workdir, "metrics.jsonl")
    rows = [r for r in read_jsonl(metrics) if "loss" in r] if paths.isfile(metrics) else []
    if rows:
        plot_loss_curve([r["step"] for r in rows], [r["loss"] for r in rows], paths.join(out_dir, "loss.png"))
    n = len(specs) * len(ev.seeds)
    print(f"toy eval ({n} images of {len(specs)} held-out prompts, {ev.steps} steps, CFG {ev.guidance:g}): "
          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in scores.items()), file=out, flush=True)
    print(f"wrote {out_dir}/grid.png, scores.json" + (", loss.png" if rows else ""), file=out, flush=True)
    return scores


hooks.register_base_maker("toy", _maker("sd3"))
hooks.register_base_maker("toy-flux", _maker("flux"))
hooks.register_evaluator("toy", evaluate_toy)
# looked up at call time, so a test can stand in for the dataset
register_source("toy", lambda resolution, seed: toy_source(resolution, seed))
