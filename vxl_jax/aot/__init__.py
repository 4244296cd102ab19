"""Compile-only planning for accelerators: programs compiled for a GPU or TPU target on a CPU-only host.

`targets` describes the devices (a GPU's target config for XLA, a TPU topology for libtpu),
`programs` builds the prefill, decode and train-step programs from abstract inputs, `flops`
counts their work analytically, and `plan` compiles one point and reports its memory.
"""

JOBS = ("prefill", "decode", "train")
COMPUTE_DTYPES = ("bfloat16", "float32")
