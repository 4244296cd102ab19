"""Checkpoint conversion: exact round trips, sharded files, and errors that name every problem."""

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vxl_jax.cli.main import main as vxl
from vxl_jax.config import ConfigError, VideoXLConfig
from vxl_jax.conversion.checkpoint import hf_to_jax, jax_to_hf, load_model, read_hf, write_hf
from vxl_jax.conversion.engine import ConversionError
from vxl_jax.conversion.safetensors_io import CheckpointReader
from vxl_jax.tiny import random_params, tiny_config, write_tiny_checkpoint


def _assert_same_tensors(dir_a, dir_b):
    a, b = CheckpointReader(dir_a), CheckpointReader(dir_b)
    assert a.keys() == b.keys()
    for key in a.keys():
        x, y = a.get(key), b.get(key)
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), f"{key} differs"


def test_cli_round_trip_of_the_fixture_checkpoint_is_bit_exact(fixtures, tmp_path, capsys):
    src = fixtures / "ckpt_A"
    assert vxl(["convert", "hf-to-jax", str(src), str(tmp_path / "jax"), "--quiet"]) == 0
    assert vxl(["convert", "jax-to-hf", str(tmp_path / "jax"), str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert "83 tensors, 217,344 parameters" in out and "peak RSS" in out
    _assert_same_tensors(src, tmp_path / "back")
    _assert_same_tensors(src / "vision_tower", tmp_path / "back" / "vision_tower")
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert (json.loads((tmp_path / "back" / "vision_tower" / "config.json").read_text())
            == json.loads((src / "vision_tower" / "config.json").read_text()))


def test_sharded_checkpoints_read_and_write(tmp_path):
    cfg = tiny_config()
    params = random_params(cfg, seed=1)
    write_hf(tmp_path / "one", params, cfg)
    write_hf(tmp_path / "sharded", params, cfg, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_same_tensors(tmp_path / "one", tmp_path / "sharded")
    again, again_cfg, _ = read_hf(str(tmp_path / "sharded"))
    assert again_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_bfloat16_checkpoints_stay_bfloat16(tmp_path):
    cfg = tiny_config()
    params = random_params(cfg, seed=2)
    params = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), params)
    write_hf(tmp_path / "hf", params, cfg)
    hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "jax"), progress=False)
    loaded, _ = load_model(str(tmp_path / "jax"))
    assert loaded["llm"]["embed_tokens"].dtype == ml_dtypes.bfloat16
    jax_to_hf(str(tmp_path / "jax"), str(tmp_path / "back"))
    _assert_same_tensors(tmp_path / "hf", tmp_path / "back")


def test_tiny_model_is_seeded(tmp_path):
    write_tiny_checkpoint(tmp_path / "a", seed=7)
    write_tiny_checkpoint(tmp_path / "b", seed=7)
    write_tiny_checkpoint(tmp_path / "c", seed=8)
    _assert_same_tensors(tmp_path / "a", tmp_path / "b")
    a, c = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    assert not np.array_equal(a["lm_head.weight"], c["lm_head.weight"])
    # Fixture-like scales: O(1) embeddings, beacon projections differ from the ordinary ones.
    assert 0.8 < a["model.embed_tokens.weight"].std() < 1.2
    assert not np.array_equal(a["model.layers.0.self_attn.beacon_k_proj.weight"],
                              a["model.layers.0.self_attn.k_proj.weight"])


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_problems_are_collected_and_named(fixtures, tmp_path):
    def edit(t):
        del t["model.layers.1.self_attn.beacon_v_proj.bias"]
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:100]
        t["model.layers.0.input_layernorm.weight"] = t["model.layers.0.input_layernorm.weight"].astype(np.int32)
        t["model.surprise.weight"] = np.zeros((3,), np.float32)
    broken = _broken_copy(fixtures / "ckpt_A", tmp_path / "broken", edit)
    with pytest.raises(ConversionError) as info:
        hf_to_jax(str(broken), str(tmp_path / "out"), progress=False)
    message = str(info.value)
    assert "4 problem(s)" in message
    assert "missing key model.layers.1.self_attn.beacon_v_proj.bias" in message
    assert "wrong shape for model.layers.0.mlp.up_proj.weight: checkpoint has [100, 64], config expects [128, 64]" in message
    assert "wrong dtype for model.layers.0.input_layernorm.weight: int32" in message
    assert "unexpected key model.surprise.weight [3]" in message
    assert not (tmp_path / "out").exists(), "nothing may be written when the source is bad"


def test_cli_reports_a_removed_key_and_exits_non_zero(fixtures, tmp_path, capsys):
    broken = _broken_copy(fixtures / "ckpt_A", tmp_path / "broken",
                          lambda t: t.pop("model.mm_projector.2.bias"))
    assert vxl(["convert", "hf-to-jax", str(broken), str(tmp_path / "out"), "--quiet"]) == 1
    assert "missing key model.mm_projector.2.bias (expected shape [64])" in capsys.readouterr().err


def test_config_round_trip_is_exact(fixtures):
    hf = json.loads((fixtures / "ckpt_A" / "config.json").read_text())
    vision = json.loads((fixtures / "ckpt_A" / "vision_tower" / "config.json").read_text())
    cfg = VideoXLConfig.from_hf_config(hf, vision)
    assert cfg.to_hf_config() == (hf, vision)
    assert VideoXLConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.tokens_per_frame == 144 and cfg.vision_layers_used == 1


def test_shipped_configs_load():
    big = VideoXLConfig.load("videoxl_7b")
    assert (big.llm.hidden_size, big.llm.num_layers, big.llm.num_kv_heads, big.llm.head_dim) == (3584, 28, 4, 128)
    assert (big.vision.hidden_size, big.vision.num_layers, big.vision_layers_used) == (1024, 24, 23)
    bench = VideoXLConfig.load("bench_small")
    assert (bench.llm.hidden_size, bench.llm.intermediate_size, bench.llm.vocab_size) == (512, 1408, 2048)


def test_bad_configs_are_explained():
    hf = tiny_config().to_hf_config()[0]
    with pytest.raises(ConfigError, match="lacks required field"):
        VideoXLConfig.from_hf_config({k: v for k, v in hf.items() if k != "hidden_size"},
                                     tiny_config().to_hf_config()[1])
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        VideoXLConfig.from_hf_config({**hf, "rope_scaling": {"rope_type": "yarn"}}, tiny_config().to_hf_config()[1])
    with pytest.raises(ConfigError, match="has no config"):
        VideoXLConfig.from_hf_config({**hf, "mm_vision_tower": "someone/unknown-clip"})
