"""Weight-only int8 / float8_e4m3fn quantisation of frozen transformer weights (sampling, LoRA bases).

Which kernels: every Linear inside the scanned block stacks (attention qkv/proj, MLPs, adaLN
modulations, FLUX's fused linear1/linear2). Those are ~99% of a released model's bytes; embedders, the
final layer, norms, biases and buffers stay in the model dtype (small, and the most sensitive).

How a quantised kernel is held: the Linear keeps its `kernel` variable, with the same shape and logical
axis names, but int8 or float8_e4m3fn values, and gains a `kernel_scale` variable (`QuantScale`) of
shape (*layers, *dout) in the model dtype, whose logical names are the kernel's stacked and output
names. The params stay a plain dict of arrays ({"kernel": int8, "kernel_scale": bf16, "bias": ...}),
so the sharding rules place both (the scale is split over "tensor" exactly like its output columns),
the block scan slices both per layer, and jit / orbax / device_put take them as they are. The
quantised structure is the float one with those variables swapped (`quantize_module`), built abstractly
like every other structure (`mmdit_jax.transformer.abstract_module(..., quantize=)`).

Scales: symmetric, per output channel (per stacked layer): s = max|w| over the input axes / QMAX, with
QMAX 127 for int8 (q = round(w / s)) and 448 for float8_e4m3fn (q = fp8(w / s), its largest finite
value); s is rounded to the model dtype first and q computed from the rounded s. An all-zero channel
gets s = 1 (q = 0).

The matmul (`dot.quantized_dot`): y = (x @ convert(q)) * s, in the compute dtype. Per-output-channel
scales commute with the contraction, so the "dequantisation" inside the dot is only a convert of q (exact:
int8 and e4m3 values are exact in bfloat16), which XLA fuses into the GEMM's operand load on GPU; the scale
multiplies the output. Correct on every backend, and the kernels are read from memory as int8 / fp8.
`dot="native"` (`quantize="int8:native"` / `"fp8:native"`) switches to the accelerator's own int8 x int8 ->
int32 or fp8 x fp8 -> float32 dot (GPU tensor cores, TPU MXU), quantising activations per token
(symmetric, absmax) on the fly: faster where those dots exist, less exact (activations are rounded
too), still correct on CPU. Its derivative with respect to x is taken through the dequantised kernel
(straight-through for the activation rounding).

Quantised models are inference-only: the int8 / fp8 kernels take no gradient (nothing trains them), but
gradients flow through the matmul to the activations, which is what LoRA on a frozen quantised base needs.
"""
from mmdit_jax.quant.formats import FORMATS, QuantSpec, dequantize, parse_quantize, quantize

__all__ = ["FORMATS", "QuantSpec", "dequantize", "parse_quantize", "quantize"]
