"""Fused CPU flash-attention kernel (vxl_jax/kernels/cpu_attention.cc) vs the xla backend's forward.

Times `cpu_attention.forward` and `attention._forward` (jitted, the same block size as `attend`), or with
--backward `cpu_attention.backward` and `attention._flash_bwd` (the xla backend's backward, given the same
residuals (q, k, v, mem_k, mem_v, mem_len, q_pos, out, lse) and d_out), on

  step   B=1, T=1620 queries, N=8 query heads, K=2 kv heads, H=64, memory lengths 14/194/374/554 in a
         buffer of S=1024: the compressed prefill's attention (memory + causal own keys);
  clip   B=40 frames (10 with --backward; --clip-frames), T=577, N=K=4, H=64: full attention without a
         mask (the 577 keys passed as memory of length 577, no own keys), as `attention.full_attention`
         runs it;
  subset (--backward only) the step's shapes with 180 query rows at sorted random positions q_pos of
         the 1620 own keys, memory 554;
  clip16 (--backward only) as clip with N=K=16: the 7B CLIP's attention.

Per case: the best of --repeats timed calls after one warm-up (compiles), and GFLOP/s counting 4*H
FLOPs per visible (query, key) pair per query head (step: T*mem_len + T*(T+1)/2 pairs per head) for the
forward, 10*H for the backward (its five matmuls: the recomputed scores, dP = dO V^T, dV = P^T dO,
dQ = dS K, dK = dS^T Q; 2.5x the forward's count).

    python benchmarks/attention_kernel_bench.py
    python benchmarks/attention_kernel_bench.py --threads 1 --repeats 5 --out results/kernel.txt
    python benchmarks/attention_kernel_bench.py --backward --mem-lens 14 554
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="VXL_KERNEL_THREADS for the kernel")
    parser.add_argument("--mem-lens", type=int, nargs="+", default=[14, 194, 374, 554],
                        help="memory lengths of the step cases (buffer S=1024)")
    parser.add_argument("--block", type=int, default=None, help="xla forward block size (default attention.BLOCK)")
    parser.add_argument("--no-xla", action="store_true", help="time the kernel only")
    parser.add_argument("--no-clip", action="store_true", help="skip the CLIP-like case")
    parser.add_argument("--backward", action="store_true",
                        help="time the backward (cpu_attention.backward vs attention._flash_bwd)")
    parser.add_argument("--clip-frames", type=int, default=None,
                        help="frames B of the CLIP-like cases (default 40 forward, 10 backward)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        os.environ["VXL_KERNEL_THREADS"] = str(args.threads)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from vxl_jax.kernels import cpu_attention
    from vxl_jax.model import attention

    if not cpu_attention.available():
        print(f"kernel unavailable: {cpu_attention.unavailable_reason()}", file=sys.stderr)
        return 1
    block = args.block or attention.BLOCK
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))

    def best(fn, *xs) -> float:
        jax.block_until_ready(fn(*xs))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*xs))
            times.append(time.perf_counter() - start)
        return min(times)

    kernel = jax.jit(cpu_attention.forward)
    lines = [f"# jax {jax.__version__}, {os.cpu_count()} cpus, kernel threads "
             f"{os.environ.get('VXL_KERNEL_THREADS', 'default')}, xla block {block}, best of {args.repeats}",
             f"{'case':<28}{'kernel s':>10}{'GFLOP/s':>9}{'xla s':>10}{'GFLOP/s':>9}{'speedup':>9}"]

    def report(name, flops, fn_kernel, fn_xla, *xs):
        tk = best(fn_kernel, *xs)
        row = f"{name:<28}{tk:>10.4f}{flops / tk / 1e9:>9.1f}"
        if fn_xla is not None:
            tx = best(fn_xla, *xs)
            row += f"{tx:>10.4f}{flops / tx / 1e9:>9.1f}{tx / tk:>8.2f}x"
        lines.append(row)
        print(row, flush=True)

    print("\n".join(lines), flush=True)
    if args.backward:
        backward_cases(args, report, normal, block)
    else:
        forward_cases(args, report, normal, block, kernel)

    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


def forward_cases(args, report, normal, block, kernel):
    import jax
    import jax.numpy as jnp

    from vxl_jax.kernels import cpu_attention
    from vxl_jax.model import attention

    b, t, n, kv, h, s = 1, 1620, 8, 2, 64, 1024
    q, k, v, mk, mv = normal(b, t, n, h), normal(b, t, kv, h), normal(b, t, kv, h), normal(b, s, kv, h), \
        normal(b, s, kv, h)
    xla = None if args.no_xla else jax.jit(lambda *xs: attention._forward(*xs, block))
    for m in args.mem_lens:
        flops = 4 * h * n * b * (t * m + t * (t + 1) / 2)
        report(f"step T={t} mem_len={m}", flops, kernel, xla, q, k, v, mk, mv, jnp.full((b,), m, jnp.int32))

    if not args.no_clip:
        b, t, heads, h = args.clip_frames or 40, 577, 4, 64
        q, k, v = normal(b, t, heads, h), normal(b, t, heads, h), normal(b, t, heads, h)
        none = jnp.zeros((b, 0, heads, h), jnp.float32)
        full = jnp.full((b,), t, jnp.int32)
        clip_xla = None if args.no_xla else jax.jit(
            lambda q, k, v: attention._forward(q, none, none, k, v, full, max(attention.BLOCK, t)))
        report(f"clip B={b} T={t} full", 4 * h * heads * b * t * t,
               jax.jit(lambda q, k, v: cpu_attention.forward(q, none, none, k, v, full)), clip_xla, q, k, v)


def backward_cases(args, report, normal, block):
    """The backward given the forward's residuals: the kernel's and the xla backend's (its custom_vjp rule)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vxl_jax.kernels import cpu_attention
    from vxl_jax.model import attention

    def case(name, pairs_per_head, n, h, q, k, v, mk, mv, ml, q_pos, xla_block):
        out, lse = cpu_attention.forward(q, k, v, mk, mv, ml, q_pos)
        d_out = normal(*q.shape)
        kernel = jax.jit(cpu_attention.backward)
        xla = None if args.no_xla else jax.jit(
            lambda q, k, v, mk, mv, ml, q_pos, out, lse, d_out:
            attention._flash_bwd(xla_block, "xla", (q, k, v, mk, mv, ml, q_pos, out, lse), d_out)[:5])
        report(name, 10 * h * n * pairs_per_head, kernel, xla, q, k, v, mk, mv, ml, q_pos, out, lse, d_out)

    b, t, n, kv, h, s = 1, 1620, 8, 2, 64, 1024
    q, k, v, mk, mv = normal(b, t, n, h), normal(b, t, kv, h), normal(b, t, kv, h), normal(b, s, kv, h), \
        normal(b, s, kv, h)
    for m in args.mem_lens:
        case(f"bwd step T={t} mem_len={m}", b * (t * m + t * (t + 1) / 2), n, h, q, k, v, mk, mv,
             jnp.full((b,), m, jnp.int32), None, block)
    # A row subset: 180 query rows at sorted positions of the 1620 own keys, over memory 554.
    rows, m = 180, 554
    pos = np.sort(np.random.default_rng(1).choice(t, rows, replace=False)).astype(np.int32)
    case(f"bwd subset T={rows}/U={t} mem={m}", b * float(rows * m + np.sum(pos + 1)), n, h, q[:, :rows], k, v,
         mk, mv, jnp.full((b,), m, jnp.int32), jnp.asarray(pos)[None].repeat(b, 0), block)
    if not args.no_clip:
        for b, heads in ((args.clip_frames or 10, 4), (args.clip_frames or 10, 16)):
            t, h = 577, 64
            q, k, v = normal(b, t, heads, h), normal(b, t, heads, h), normal(b, t, heads, h)
            none = jnp.zeros((b, 0, heads, h), jnp.float32)
            case(f"bwd clip B={b} N={heads} T={t}", b * t * t, heads, h, q, none, none, k, v,
                 jnp.full((b,), t, jnp.int32), None, max(attention.BLOCK, t))


if __name__ == "__main__":
    sys.exit(main())
