"""Native kernels (C++ XLA FFI custom calls), built on first use: see `cpu_attention`."""
