"""The pieces the converter streams with: shapes known before any data is read (they must agree with
the conversions themselves, for every rule kind), fast transposed copies, header-first safetensors
writing, and the per-array Orbax writer / grouped restore."""
import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from mmdit_jax.io import orbax_io, rules
from mmdit_jax.io.safetensors_io import SafetensorsWriter, TensorFile

R = np.random.default_rng(0)

CASES = [  # (rule, external shapes per key, patch)
    (rules.rule("a", "w", "w", "linear"), [(6, 5)], None),
    (rules.rule("a", ["q", "k", "v"], "qkv", "linear"), [(4, 5)] * 3, None),
    (rules.rule("a", ["q", "k", "v", "m"], "l1", "linear", parts=(4, 4, 4, 9)), [(4, 5)] * 3 + [(9, 5)], None),
    (rules.rule("a", "b", "b", "vector", swapped_in=("diffusers",)), [(8,)], None),
    (rules.rule("a", ["bq", "bk"], "bqk", "vector"), [(3,), (3,)], None),
    (rules.rule("a", "p", "p", "patch"), [(7, 3, 2, 2)], 2),
    (rules.rule("a", "t", "t", "table"), [(1, 12, 7)], None),
    (rules.rule("a", "c", "c", "conv"), [(5, 3, 3, 3)], None),
    (rules.rule("a", "c", "c", {"diffusers": "linear", "original": "pointwise"}), [(5, 4)], None),
]


@pytest.mark.parametrize("rule,shapes,patch", CASES)
@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_shapes_without_data_match_the_conversions(rule, shapes, patch, layout):
    if layout == "original" and kind_needs_original_shapes(rule):
        shapes = [(5, 4, 1, 1)]
    if len(rule.keys[layout]) != len(shapes):  # the other layout fuses the keys
        joined = (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
        shapes = [joined]
    arrays = [R.standard_normal(s).astype(np.float32) for s in shapes]
    internal = rules.to_internal(rule, arrays, layout)
    assert rules.internal_shape(rule, shapes, layout) == internal.shape
    back = rules.from_internal(rule, internal, layout, patch)
    assert rules.external_shapes(rule, internal.shape, layout, patch) == [b.shape for b in back]
    for a, b in zip(arrays, back):
        assert np.array_equal(a, b) and b.flags.c_contiguous


def kind_needs_original_shapes(rule):
    return rules.kind_of(rule, "original") == "pointwise"


def test_mismatched_parts_are_reported_not_raised():
    rule = rules.rule("a", ["q", "k"], "qk", "linear")
    assert rules.internal_shape(rule, [(4, 5), (4, 6)], "diffusers") is None


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32, np.float16])
def test_copy_into_transposed_and_casting(dtype):
    a = R.standard_normal((1100, 37)).astype(dtype)
    for out_dtype in (dtype, np.float32, ml_dtypes.bfloat16):
        out = np.empty((37, 1100), out_dtype)
        rules.copy_into(out, a.T)
        assert np.array_equal(out, a.T.astype(out_dtype))
    c = rules.contiguous(a.T)
    assert c.flags.c_contiguous and np.array_equal(c, a.T)


def test_safetensors_writer_any_order_and_atomic(tmp_path):
    specs = [("a", (3, 4), np.float32), ("b", (5,), np.dtype(ml_dtypes.bfloat16)), ("c", (), np.int64)]
    data = {"a": R.standard_normal((3, 4)).astype(np.float32),
            "b": R.standard_normal(5).astype(ml_dtypes.bfloat16), "c": np.array(7)}
    path = str(tmp_path / "x.safetensors")
    w = SafetensorsWriter(path, specs, {"format": "pt"})
    for k in ("c", "a", "b"):
        w.write(k, data[k])
    w.close()
    got = safetensors.numpy.load_file(path)
    assert all(np.array_equal(got[k], data[k]) for k in data)
    assert TensorFile(path).metadata == {"format": "pt"}
    w = SafetensorsWriter(str(tmp_path / "y.safetensors"), specs)
    w.write("a", data["a"])
    with pytest.raises(AssertionError, match="never written"):
        w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_params_writer_and_grouped_restore(tmp_path):
    tree = {"groups": {0: {"w": R.standard_normal((3, 4, 5)).astype(np.float32)},
                       1: {"w": R.standard_normal((2, 4, 5)).astype(np.float32)}},
            "big": R.standard_normal((64, 64)).astype(np.float32), "b": np.arange(3, dtype=np.float32)}
    w = orbax_io.ParamsWriter(str(tmp_path), flush_bytes=1000)  # several partial saves
    for path, leaf in [(("groups", 0, "w"), tree["groups"][0]["w"]), (("big",), tree["big"]),
                       (("groups", 1, "w"), tree["groups"][1]["w"]), (("b",), tree["b"])]:
        w.add(path, leaf)
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params"]
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    back = orbax_io.restore_params(str(tmp_path), template)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        assert isinstance(x, jax.Array) and np.array_equal(np.asarray(x), y)
    leaves = [(tuple(getattr(k, "key", k) for k in p), jax.ShapeDtypeStruct(t.shape, ml_dtypes.bfloat16))
              for p, t in jax.tree_util.tree_leaves_with_path(template)]
    groups = list(orbax_io.restore_groups(str(tmp_path), leaves, group_bytes=200))
    assert len(groups) > 1
    got = {p: a for g in groups for p, a in g.items()}
    for p, t in leaves:  # cast on restore, as the loaders ask
        want = tree
        for k in p:
            want = want[k]
        assert got[p].dtype == ml_dtypes.bfloat16 and np.array_equal(got[p], want.astype(ml_dtypes.bfloat16))
    bad = jax.tree.map(lambda t: t, template)
    bad["big"] = jax.ShapeDtypeStruct((64, 65), np.float32)
    with pytest.raises(orbax_io.MMDiTError, match="big has shape"):
        orbax_io.check_saved(str(tmp_path), bad)
