"""Numerical parity with the HF torch models, and lossless checkpoint round trips.

A tiny random `Qwen2ForCausalLM` and `CLIPVisionModel` (float32, eager attention,
weights redrawn at O(1) scales so logits and attention are far from uniform)
are saved with `save_pretrained` and imported with `import_parts`. Checked:

  * JAX logits == torch logits (full and right-padded batches), JAX CLIP hidden
    states == torch `hidden_states`;
  * `write_hf` output reloads in torch (CLIPVisionModel.from_pretrained, Qwen2
    load_state_dict strict) and gives the original model's outputs exactly;
  * HF -> JAX (orbax) -> HF reproduces every tensor bit for bit;
  * the VST parameters are initialised from q/k/v and the eos embedding.
"""

from __future__ import annotations

import json

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vxl_jax.conversion.checkpoint import hf_to_jax, import_parts, jax_to_hf, write_hf  # noqa: E402
from vxl_jax.conversion.safetensors_io import CheckpointReader  # noqa: E402
from vxl_jax.model import clip, qwen2, videoxl  # noqa: E402

EOS = 5
VOCAB = 128
B, T, SHORT = 2, 20, 12
LOGIT_TOL = 1e-4
CLIP_TOL = 1e-5


# ------------------------------------------------------------------ helpers

def _redraw_(model: "torch.nn.Module") -> None:
    """Re-initialises every parameter in place at O(1) scales (call after torch.manual_seed).

    Norm weights 1 + N(0, 0.1^2); token/position/class embeddings N(0, 1);
    biases (q/k/v included) and all other weights N(0, 0.1^2).
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = name.rsplit(".", 2)[-2] if name.count(".") else ""
            if ("norm" in module or "layrnorm" in module) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed" in name and "patch" not in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.1)


def _tiny_qwen2() -> "transformers.Qwen2ForCausalLM":
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, eos_token_id=EOS,
        tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    _redraw_(model)
    return model.eval()


def _tiny_clip() -> "transformers.CLIPVisionModel":
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=336, patch_size=14,
                                        hidden_act="quick_gelu")
    model = transformers.CLIPVisionModel._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    _redraw_(model)
    return model.eval()


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


def _torch_hidden(model, pixels: np.ndarray) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    return tuple(h.numpy() for h in out.hidden_states)


def _jax_logits(params, cfg, ids: np.ndarray) -> np.ndarray:
    hidden, _ = videoxl.forward(params, cfg, jnp.asarray(ids, jnp.int32))
    return np.asarray(qwen2.logits(params["llm"], cfg.llm, hidden))


def _max_diff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def _read_all(path) -> dict[str, np.ndarray]:
    reader = CheckpointReader(str(path))
    return {key: reader.get(key) for key in reader.keys()}


def _is_llm_key(key: str) -> bool:
    return ("beacon_" not in key and "vision_tower" not in key and "mm_projector" not in key)


# ----------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The torch models, their saved dirs, and the imported (params, cfg)."""
    torch.manual_seed(0)
    llm, tower = _tiny_qwen2(), _tiny_clip()
    root = tmp_path_factory.mktemp("parts")
    llm.save_pretrained(root / "qwen2", safe_serialization=True)
    tower.save_pretrained(root / "clip", safe_serialization=True)
    params, cfg, _ = import_parts(str(root / "qwen2"), str(root / "clip"), seed=0, progress=False)
    return {"llm": llm, "tower": tower, "params": params, "cfg": cfg}


@pytest.fixture(scope="module")
def exported(parts, tmp_path_factory):
    """The imported params written as an HF Video-XL dir."""
    out = tmp_path_factory.mktemp("videoxl_hf")
    write_hf(str(out), parts["params"], parts["cfg"])
    return out


@pytest.fixture(scope="module")
def round_tripped(exported, tmp_path_factory):
    """`exported` converted HF -> vxl_jax (orbax) -> HF."""
    root = tmp_path_factory.mktemp("round_trip")
    hf_to_jax(str(exported), str(root / "jax"), progress=False)
    jax_to_hf(str(root / "jax"), str(root / "hf"))
    return root / "hf"


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, VOCAB, (B, T)).astype(np.int64)


@pytest.fixture(scope="module")
def pixels():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 336, 336, generator=gen, dtype=torch.float32).numpy()


# -------------------------------------------------------------------- tests

def test_models_are_not_degenerate(parts, ids):
    """Guards the fixture: O(1) logits that differ across positions (else parity proves little)."""
    logits = _torch_logits(parts["llm"], ids)
    assert 0.3 < float(np.std(logits)) < 30
    assert float(np.std(logits.argmax(-1))) > 0


def test_logits_match_torch(parts, ids):
    want = _torch_logits(parts["llm"], ids)
    got = _jax_logits(parts["params"], parts["cfg"], ids)
    diff = _max_diff(got, want)
    print(f"\nqwen2 logits max abs diff (B={B}, T={T}): {diff:.3e}")
    assert diff < LOGIT_TOL


def test_padded_batch_matches_unpadded_torch(parts, ids):
    padded = ids.copy()
    padded[1, SHORT:] = 0
    got = _jax_logits(parts["params"], parts["cfg"], padded)        # right padding: causality hides it
    assert np.isfinite(got).all()
    full = _max_diff(got[0], _torch_logits(parts["llm"], ids[:1])[0])
    short = _max_diff(got[1, :SHORT], _torch_logits(parts["llm"], ids[1:2, :SHORT])[0])
    print(f"\npadded batch max abs diff: full row {full:.3e}, {SHORT}-token row {short:.3e}")
    assert full < LOGIT_TOL and short < LOGIT_TOL


def test_clip_features_match_torch(parts, pixels):
    hidden = _torch_hidden(parts["tower"], pixels)
    cfg = parts["cfg"]
    got = np.asarray(videoxl.clip_features(parts["params"], cfg, jnp.asarray(pixels)))
    diff = _max_diff(got, hidden[cfg.projector.select_layer][:, 1:])
    # Every layer count, so the layers past the selected one are covered too.
    per_layer = [_max_diff(clip.hidden_state(parts["params"]["vision"], cfg.vision, jnp.asarray(pixels), n),
                           hidden[n]) for n in range(len(hidden))]
    print(f"\nclip_features max abs diff: {diff:.3e}; hidden_states[0..]: "
          + ", ".join(f"{d:.3e}" for d in per_layer))
    assert diff < CLIP_TOL
    assert max(per_layer) < CLIP_TOL


def test_exported_vision_tower_reloads_identically(parts, exported, pixels):
    reloaded = transformers.CLIPVisionModel.from_pretrained(
        str(exported / "vision_tower"), attn_implementation="eager", dtype=torch.float32).eval()
    want, got = _torch_hidden(parts["tower"], pixels), _torch_hidden(reloaded, pixels)
    diff = _max_diff(got[-2], want[-2])
    print(f"\nreloaded CLIP hidden_states[-2] max abs diff: {diff:.3e}")
    assert diff == 0.0
    for name, p in parts["tower"].state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], p), name


def test_exported_llm_reloads_identically(parts, exported, ids):
    tensors = {k: torch.from_numpy(v.copy()) for k, v in _read_all(exported).items() if _is_llm_key(k)}
    model = transformers.Qwen2ForCausalLM._from_config(parts["llm"].config, attn_implementation="eager",
                                                       dtype=torch.float32)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    diff = _max_diff(_torch_logits(model, ids), _torch_logits(parts["llm"], ids))
    print(f"\nreloaded Qwen2 logits max abs diff: {diff:.3e}")
    assert diff == 0.0


def test_hf_jax_hf_round_trip_is_bit_identical(exported, round_tripped):
    for sub in (".", "vision_tower"):
        before, after = _read_all(exported / sub), _read_all(round_tripped / sub)
        assert sorted(before) == sorted(after), sub
        for key, a in before.items():
            b = after[key]
            assert (a.dtype, a.shape) == (b.dtype, b.shape), key
            assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), key
    print(f"\nround trip: {len(_read_all(exported))} + {len(_read_all(exported / 'vision_tower'))} "
          "tensors bit-identical")


def test_hf_jax_hf_round_trip_keeps_configs(exported, round_tripped):
    for name in ("config.json", "vision_tower/config.json", "generation_config.json"):
        assert json.loads((round_tripped / name).read_text()) == json.loads((exported / name).read_text()), name


def test_vst_initialised_from_qkv_and_eos(parts, exported):
    llm = parts["params"]["llm"]
    layers = llm["layers"]
    for proj in ("q_proj", "k_proj", "v_proj"):
        for leaf in ("kernel", "bias"):
            src, vst = layers[proj][leaf], layers["vst_" + proj][leaf]
            np.testing.assert_array_equal(vst, src)
            assert not np.shares_memory(vst, src), (proj, leaf)
    assert llm["vst_embed"].shape == (1, llm["embed_tokens"].shape[1])
    np.testing.assert_array_equal(llm["vst_embed"][0], llm["embed_tokens"][EOS])
    # The same holds in the exported HF keys.
    hf = _read_all(exported)
    for i in range(parts["cfg"].llm.num_layers):
        for proj in ("q", "k", "v"):
            for leaf in ("weight", "bias"):
                base = f"model.layers.{i}.self_attn."
                np.testing.assert_array_equal(hf[f"{base}beacon_{proj}_proj.{leaf}"], hf[f"{base}{proj}_proj.{leaf}"])
    np.testing.assert_array_equal(hf["model.beacon_embed_tokens.weight"][0], hf["model.embed_tokens.weight"][EOS])
