"""Programs compiled for accelerators on this CPU-only host (`vxl aot`): GPU (H100) and TPU (v5p) targets.

Needs the `aot` extra (the CUDA plugin and libtpu; `make test` installs it). The compiles run in
`vxl aot` child processes (JAX_PLATFORMS=cpu, XLA's GPU flags set before jax starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jax_plugins.xla_cuda12", reason="the aot extra (jax[cuda12]) is not installed")
pytest.importorskip("libtpu", reason="the aot extra (libtpu) is not installed")


def _aot(tmp_path, *args) -> list[dict]:
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    proc = subprocess.run([sys.executable, "-m", "vxl_jax.cli.main", "aot", *args, "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


# bench_small's three programs at 1 device and at 8 (rows over data; the train state over fsdp), one `vxl aot`
# child per (target, devices).
CASES = [(target, job, devices) for target in ("h100", "tpu-v5p") for devices in (1, 8)
         for job in ("prefill", "decode", "train")]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    reports = {}
    for target, devices in dict.fromkeys((t, d) for t, _, d in CASES):
        rows = _aot(tmp_path_factory.mktemp(f"{target}_{devices}"), "--target", target, "--devices", str(devices),
                    "--job", "prefill", "decode", "train", "--config", "bench_small", "--frames", "20",
                    "--ratio", "8")
        reports.update({(target, r["job"], devices): r for r in rows})
    return reports


@pytest.mark.parametrize("target,job,devices", CASES, ids=[f"{t}-{j}-{d}dev" for t, j, d in CASES])
def test_bench_small_compiles_for_the_accelerator(compiled, target, job, devices):
    r = compiled[target, job, devices]
    b = r["per_device_bytes"]
    assert b["total"] == b["argument"] + b["output"] + b["temp"] - b["alias"] > 0
    assert r["fits"] and r["device_memory_bytes"] > b["total"]
    assert r["devices"] == devices and r["rows"] == devices
    assert not [c for c in r["custom_calls"] if "vxl_flash" in c], "a CPU custom call reached an accelerator program"
    if target == "h100":
        assert r["attention_backend"] == "cudnn" and r["clip_attention_backend"] == "cudnn"
        assert any(c.startswith("__cudnn$fmha") for c in r["custom_calls"]), r["custom_calls"]
        if job == "train":
            assert any("Backward" in c for c in r["custom_calls"]), r["custom_calls"]
    else:
        assert r["attention_backend"] == "xla" and not any("cudnn" in c for c in r["custom_calls"])
    if job == "train":
        assert b["alias"] > 0, "the train state is donated"
        assert r["mesh"] == {"data": 1, "fsdp": devices, "tensor": 1}
        if devices == 8:      # the state is split 8 ways: far less of it on each device than on one
            assert b["argument"] < compiled[target, job, 1]["per_device_bytes"]["argument"] / 3
    else:
        assert r["mesh"] == {"data": devices, "fsdp": 1, "tensor": 1}
    assert r["flops"] > 0 and r["estimate"]["seconds"] > 0


# ---------------------------------------------------------------- the target decides, not the process

def _mesh(target, devices=1):
    from vxl_jax import parallel
    from vxl_jax.aot import targets
    _, devs = targets.topology(target, devices)
    return parallel.make_mesh(parallel.MeshConfig(data=devices), devices=devs)


@pytest.mark.parametrize("target,dtype,expected", [("h100", "bfloat16", "cudnn"), ("h100", "float32", "xla"),
                                                   ("tpu-v5p", "bfloat16", "xla"), ("tpu-v6e", "float32", "xla")])
def test_auto_attention_follows_the_mesh_not_the_process(target, dtype, expected):
    import jax
    import jax.numpy as jnp

    from vxl_jax import target as target_lib
    from vxl_jax.model import attention

    assert jax.default_backend() == "cpu"
    with jax.set_mesh(_mesh(target)):
        assert target_lib.platform() == ("gpu" if target == "h100" else "tpu")
        assert attention.resolve("auto", jnp.dtype(dtype)) == expected
        with pytest.raises(ValueError, match="runs on cpu only"):
            attention.resolve("cpu", jnp.float32)
    if target == "h100":
        with jax.set_mesh(_mesh("tpu-v5p")), pytest.raises(ValueError, match="runs on gpu only"):
            attention.resolve("cudnn", jnp.bfloat16)


def test_a_cpu_mesh_of_several_devices_takes_xla():
    import jax
    import jax.numpy as jnp

    from vxl_jax import parallel
    from vxl_jax.model import attention

    devices = jax.devices()
    with jax.set_mesh(parallel.make_mesh(parallel.MeshConfig(data=1), devices=devices[:1])):
        one = attention.resolve("auto", jnp.float32)
    assert one in ("cpu", "xla")           # cpu where the kernel builds
    if len(devices) > 1:
        with jax.set_mesh(parallel.make_mesh(parallel.MeshConfig(data=len(devices)), devices=devices)):
            assert attention.resolve("auto", jnp.float32) == "xla"


def test_abstract_inputs_carry_the_real_shardings():
    import jax

    from vxl_jax import parallel

    mesh = _mesh("tpu-v5p", 4)
    x = np.zeros((4, 3, 2), np.int32)
    a = parallel.host_to_global({"x": x, "w": np.zeros((5,), np.float32)}, mesh, abstract=True)
    assert isinstance(a["x"], jax.ShapeDtypeStruct) and a["x"].shape == (4, 3, 2) and a["x"].dtype == np.int32
    assert a["x"].sharding.spec[0] == "data"          # rows over (data, fsdp): here data = 4
    r = parallel.host_to_global(x, mesh, replicated=True, abstract=True)
    assert r.shape == x.shape and r.sharding.spec == jax.sharding.PartitionSpec()


def test_target_configs_and_topologies():
    from vxl_jax.aot import targets

    for name, t in targets.TARGETS.items():
        desc, devs = targets.topology(name, 4)
        assert len(devs) == 4 and devs[0].device_kind == t.device_kind, (name, devs[0].device_kind)
        if t.platform == "gpu":
            assert f"device_memory_size: {t.memory_bytes}" in t.gpu.target_config()
    assert len(targets.topology("tpu-v5p", 1)[1]) == 1
    with pytest.raises(ValueError, match="unknown target"):
        targets.get("h800")


def test_custom_call_guard_reads_the_hlo():
    from vxl_jax.aot import plan

    text = ('%a = f32[2] custom-call(%x), custom_call_target="vxl_flash_attention_forward_f32"\n'
            '%b = bf16[2] custom-call(%y), custom_call_target="__cudnn$fmhaSoftmax"')
    assert plan._custom_calls(text) == ["__cudnn$fmhaSoftmax", "vxl_flash_attention_forward_f32"]


def test_flops_count_every_window_and_scale_with_rows():
    from vxl_jax.aot import flops
    from vxl_jax.compress.plan import make_plan
    from vxl_jax.config import VideoXLConfig

    cfg = VideoXLConfig.load("bench_small")
    one = make_plan(14, 1440, 16, [8], window=1440)
    two = make_plan(14, 2880, 16, [8, 8], window=1440)
    # the second window adds its own tokens' work plus attention over the first window's kept entries
    assert flops.prefill(cfg, two) > 2 * flops.prefill(cfg, one) - flops.prefill(cfg, make_plan(14, 0, 16, []))
    assert flops.train_step(cfg, [one, one], 10, 46) == 2 * flops.train_step(cfg, [one], 10, 46)
    assert flops.decode(cfg, 100, 4, rows=3) == 3 * flops.decode(cfg, 100, 4)


def test_an_independent_compile_agrees_with_vxl_aot(compiled):
    """The prefill `vxl aot` reported, compiled again here by hand: straight `jax.jit(prefill).lower(...)` on a
    mesh of one H100 from the topology, inputs built from the plan without `aot.programs`."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    from vxl_jax.aot import targets
    from vxl_jax.compress import packing, prefill
    from vxl_jax.compress.plan import make_plan
    from vxl_jax.config import VideoXLConfig
    from vxl_jax.model import videoxl

    if "--xla_gpu_autotune_level=0" not in os.environ.get("XLA_FLAGS", ""):
        pytest.skip("an in-process GPU compile needs XLA's GPU flags set before jax starts (the child tests cover it)")
    cfg = VideoXLConfig.load("bench_small")
    topo = topologies.get_topology_desc(platform="cuda", target_config=targets.TARGETS["h100"].gpu.target_config(),
                                        topology="1x1x1")
    mesh = jax.sharding.Mesh(np.array(topo.devices), ("data",))
    rep = NamedSharding(mesh, P())
    plan = make_plan(14, 20 * cfg.tokens_per_frame, 16, [8] * 2, window=cfg.vst.window)
    arrays, spec = packing.pack([plan], [np.arange(11, 25)], [np.arange(11, 27)], max_new_tokens=16)
    arrays = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=rep), arrays)
    shapes = jax.eval_shape(lambda: videoxl.init_params(cfg, jax.random.key(0), jnp.bfloat16))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), shapes)
    frames = jax.ShapeDtypeStruct((1, arrays.num_windows * 10, 3, 336, 336), jnp.uint8, sharding=rep)
    norm = (jax.ShapeDtypeStruct((3,), jnp.float32, sharding=rep),) * 2
    with jax.set_mesh(mesh):
        stats = jax.jit(prefill.prefill, static_argnames=("cfg", "spec", "dtype")).lower(
            params, cfg, arrays, frames, spec=spec, pixel_norm=norm, dtype=jnp.bfloat16).compile().memory_analysis()
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes \
        - stats.alias_size_in_bytes
    reported = compiled["h100", "prefill", 1]["per_device_bytes"]["total"]
    assert abs(total - reported) <= 0.02 * reported, (total, reported)
