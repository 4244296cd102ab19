"""The lmms-eval model `vxl_jax` (`vxl_jax/eval/lmms_plugin.py`): its args, its `generate_until` on a fake
answerer, and `python -m lmms_eval --model vxl_jax` end to end on a generated local task (slow).

lmms-eval lives in its own venv (the `lmms` extra; see the README):

    .venv-lmms/bin/python -m pytest -q -m slow tests/test_lmms_plugin.py   # the end-to-end runs
    .venv-lmms/bin/python -m pytest -q tests/test_lmms_plugin.py           # the fast ones

Everything here is skipped where lmms_eval is not importable (the default venv).
"""

import glob
import json
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[lmms]' in its own venv)")

from lmms_eval.api.instance import Instance  # noqa: E402

from vxl_jax.eval import lmms_plugin  # noqa: E402
from vxl_jax.eval.lmms_plugin import VXLJax, cut_at_stop  # noqa: E402

# ---------------------------------------------------------------- fast: args, grouping, batching, stop strings


class FakeAnswerer:
    """Records encode_many / answer calls; answers '<question>|<max_new_tokens>|<temperature>\\n\\ntail'."""

    def __init__(self, fail_on=None):
        self.encoded, self.asked, self.fail_on = [], [], fail_on

    def encode_many(self, sources, *, sampling, progress, **options):
        for s in sources:
            if isinstance(s, str) and s == self.fail_on:
                raise ValueError(f"cannot read video {s}: broken")
        self.encoded.append([s if isinstance(s, str) else np.asarray(s).shape for s in sources])
        return [types.SimpleNamespace(source=s, options=options) for s in sources]

    def answer(self, pairs, *, max_new_tokens, decoding, seed, progress):
        self.asked.append([q for _, q in pairs])
        return [types.SimpleNamespace(text=f"{q}|{max_new_tokens}|{decoding.temperature}\n\ntail") for _, q in pairs]


def _model(monkeypatch, answerer=None, keep_cache=False, **args):
    """The plug-in over a fake answerer; its compilation-cache settings are put back unless keep_cache."""
    answerer = answerer or FakeAnswerer()
    monkeypatch.setattr(lmms_plugin, "_load_answerer", lambda pretrained, dtype, progress: answerer)
    model = VXLJax(pretrained="ckpt", **args)
    if not keep_cache:
        model.restore_compilation_cache()
    return model, answerer


def _requests(model, docs, gen_kwargs=None, task="t"):
    """generate_until Instances over `docs` (dicts with 'visual' and 'q'), as lmms-eval builds them."""
    model.task_dict[task] = {"test": docs}
    if gen_kwargs is None:
        gen_kwargs = {"until": ["\n\n"], "max_new_tokens": 16, "temperature": 0}
    return [Instance("generate_until", (d["q"], dict(gen_kwargs), lambda doc: doc["visual"], i, task, "test"), 0,
                     {"task": task, "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]


def test_the_entry_point_names_the_model():
    from lmms_eval.models import get_model, get_model_manifest

    assert get_model_manifest("vxl_jax").simple_class_path == "vxl_jax.eval.lmms_plugin.VXLJax"
    assert get_model("vxl_jax") is VXLJax


def test_model_args_map_to_the_cli_options(monkeypatch):
    from vxl_jax.data import video

    model, _ = _model(monkeypatch)
    assert model.sampling == video.uniform(32) and model.encode_options["ratio"] == 8
    assert model.encode_options["x2l"] is None and model.encode_options["schedule"] is None
    model, _ = _model(monkeypatch, max_frames_num=16, fps=1.0, ratio="none", max_new_tokens=7, seed=3)
    assert model.sampling == video.by_fps(1.0, 16) and model.encode_options["ratio"] is None
    assert model.max_new_tokens == 7 and model.seed == 3 and model.encode_options["seed"] == 3
    # ';' for ',' (lmms-eval splits model args at commas), or a quoted value; x2l_* one option each.
    model, _ = _model(monkeypatch, schedule="per-window:ratios=2/4", x2l="low=2;high=16", x2l_k=2,
                      x2l_oracle="uniform")
    x2l = model.encode_options["x2l"]
    assert (x2l.low, x2l.high, x2l.k, x2l.oracle) == (2, 16, 2, "uniform")
    assert callable(model.encode_options["schedule"])
    model, _ = _model(monkeypatch, schedule='"dynamic:ratio=8,threshold=0.1"', x2l=True)
    assert model.encode_options["x2l"] is not None and callable(model.encode_options["schedule"])
    assert _model(monkeypatch, x2l=1)[0].encode_options["x2l"] is not None
    assert _model(monkeypatch, x2l=0)[0].encode_options["x2l"] is None
    assert _model(monkeypatch, x2l="false")[0].encode_options["x2l"] is None
    with pytest.raises(ValueError, match="unknown model args"):
        _model(monkeypatch, frames=8)
    with pytest.raises(Exception, match="unknown schedule"):
        _model(monkeypatch, schedule="nope")
    with pytest.raises(ValueError, match="X2L options"):
        _model(monkeypatch, x2l="low=2;depth=3")
    with pytest.raises(ValueError, match="pretrained"):
        VXLJax()


def test_the_compilation_caches_are_on_as_in_the_cli_unless_off(monkeypatch, tmp_path):
    import jax

    from vxl_jax import program_cache

    monkeypatch.setenv("VXL_COMPILATION_CACHE", str(tmp_path / "from_env"))
    before = (jax.config.jax_compilation_cache_dir, program_cache.folder())
    for arg, folder in [(None, tmp_path / "from_env"), (str(tmp_path / "given"), tmp_path / "given")]:
        model, _ = _model(monkeypatch, keep_cache=True, **({} if arg is None else {"compilation_cache": arg}))
        try:
            assert model.compilation_cache == str(folder) == jax.config.jax_compilation_cache_dir
            assert jax.config.jax_enable_compilation_cache and folder.is_dir()
            assert program_cache.folder() == str(folder / "programs")
        finally:
            model.restore_compilation_cache()
    for off in ("off", False, 0):
        model, _ = _model(monkeypatch, keep_cache=True, compilation_cache=off)
        try:
            assert model.compilation_cache is None and program_cache.folder() is None
            assert not jax.config.jax_enable_compilation_cache
        finally:
            model.restore_compilation_cache()
    assert (jax.config.jax_compilation_cache_dir, program_cache.folder()) == before     # put back


def test_each_video_is_encoded_once_and_questions_are_batched(monkeypatch, tmp_path):
    from PIL import Image

    model, fake = _model(monkeypatch, batch_size=2)
    png = tmp_path / "a.png"
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(png)
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for k in range(3):
        Image.fromarray(np.full((10, 12, 3), k, np.uint8)).save(frames_dir / f"{k}.jpg")
    pil = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    docs = [{"visual": ["a.mp4"], "q": "q0"}, {"visual": ["b.mp4"], "q": "q1"}, {"visual": ["a.mp4"], "q": "q2"},
            {"visual": [str(png)], "q": "q3"}, {"visual": [pil], "q": "q4"}, {"visual": [pil, pil.resize((4, 6))],
                                                                            "q": "q5"},
            {"visual": [str(frames_dir)], "q": "q6"}, {"visual": ["a.mp4"], "q": "q7"}]
    out = model.generate_until(_requests(model, docs))
    assert out == [f"q{i}|16|0.0" for i in range(8)]   # cut at the task's stop string
    # Two visuals per encode (batch_size 2); a.mp4 once for its three questions; images become frames.
    assert fake.encoded == [["a.mp4", "b.mp4"], [(1, 20, 30, 3), (1, 8, 8, 3)], [(2, 8, 8, 3), (3, 10, 12, 3)]]
    assert fake.asked == [["q0", "q2"], ["q7", "q1"], ["q3", "q4"], ["q5", "q6"]]


def test_gen_kwargs_decide_decoding_and_stop_strings(monkeypatch):
    model, fake = _model(monkeypatch, max_new_tokens=5)
    docs = [{"visual": ["a.mp4"], "q": "a b c"}]
    assert model.generate_until(_requests(model, docs, {"until": " b"})) == ["a"]
    assert model.generate_until(_requests(model, docs, {})) == ["a b c|5|0.0\n\ntail"]   # model default, no stop
    assert model.generate_until(_requests(model, docs, {"temperature": 0.7, "max_new_tokens": 3})) == \
        ["a b c|3|0.7\n\ntail"]
    assert model.generate_until(_requests(model, docs, {"temperature": 0.7, "do_sample": False})) == \
        ["a b c|5|0.0\n\ntail"]
    assert cut_at_stop("x. y\n\nz", ["\n\n", ". "]) == "x" and cut_at_stop("abc", []) == "abc"


def test_a_broken_video_answers_empty_unless_strict(monkeypatch):
    docs = [{"visual": ["bad.mp4"], "q": "q0"}, {"visual": ["good.mp4"], "q": "q1"}, {"visual": [], "q": "q2"}]
    model, fake = _model(monkeypatch, FakeAnswerer(fail_on="bad.mp4"), batch_size=4)
    assert model.generate_until(_requests(model, docs)) == ["", "q1|16|0.0", ""]
    assert fake.encoded == [["good.mp4"]]   # the batch failed, then one at a time
    model, _ = _model(monkeypatch, FakeAnswerer(fail_on="bad.mp4"), strict=True)
    with pytest.raises(ValueError, match="broken"):
        model.generate_until(_requests(model, docs[:2]))
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        model.loglikelihood([])


# ---------------------------------------------------------------- slow: the real model, through lmms-eval


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from vxl_jax.eval.lmms_synthetic import TASK, write_synthetic_task
    from vxl_jax.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("lmms")
    write_tiny_checkpoint(str(root / "ckpt"), seed=0)
    write_synthetic_task(str(root / "task"), videos=2, images=2)
    return root, TASK


def _expected(answerer, task_dir, doc, prompt, **options):
    """What `Answerer.ask` says to the task's prompt about the doc's visual, cut at lmms-eval's default stop."""
    from PIL import Image

    from vxl_jax.data import video

    path = os.path.join(task_dir, doc["visual"])
    if doc["kind"] == "video":
        text = answerer.ask(path, prompt, sampling=video.uniform(4), **options).text
    else:
        frames = np.asarray(Image.open(path).convert("RGB"))[None]
        text = answerer.ask_frames(frames, prompt, **options).text
    return cut_at_stop(text, ["\n\n"]).strip()


@pytest.mark.slow
def test_lmms_eval_runs_vxl_jax_on_a_local_task(task):
    root, name = task
    out = root / "out"
    env = dict(os.environ, HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vxl_jax",
           "--model_args", f"pretrained={root / 'ckpt'},max_frames_num=4,strict=true,"
                           f"compilation_cache={root / 'cache'}",
           "--tasks", name, "--include_path", str(root / "task"), "--output_path", str(out),
           "--batch_size", "1", "--log_samples"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    # lmms-eval exits 0 even when the evaluation raised: the results file is the proof.
    results = glob.glob(str(out / "*" / "*_results.json"))
    assert len(results) == 1, f"no results JSON ({time.perf_counter() - t:.0f} s)\n{log}"
    with open(results[0]) as f:
        result = json.load(f)
    docs = json.load(open(root / "task" / "data.json"))
    assert result["n-samples"][name] == {"original": len(docs), "effective": len(docs)}
    assert 0.0 <= result["results"][name]["accuracy,none"] <= 1.0
    samples = [json.loads(line) for line in open(glob.glob(str(out / "*" / f"*_samples_{name}.jsonl"))[0])]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(docs)))
    assert all(s["accuracy"] in (0.0, 1.0) for s in samples)
    kept = {p.name.split("-")[0] for p in (root / "cache" / "programs").iterdir()}
    assert {"encode", "ask_prefill", "generate"} <= kept, kept     # a second run loads them

    # Every response is what Answerer.ask gives to the same prompt and frames (so grouping by video and
    # encoding once changed nothing); the random model's words are no answer, so accuracy is not checked.
    from vxl_jax.infer import Answerer

    answerer = Answerer.load(str(root / "ckpt"))
    for s in samples:
        got = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
        assert isinstance(got, str)
        doc = docs[s["doc_id"]]
        assert got.strip() == _expected(answerer, str(root / "task"), doc, s["input"], max_new_tokens=8), doc


@pytest.mark.slow
def test_x2l_and_a_schedule_through_the_plugin(task):
    """The plugin's X2L and schedule args reach the answerer: its answers equal `ask` with the same options."""
    from vxl_jax.compress import schedules
    from vxl_jax.x2l.runner import X2LConfig

    root, _ = task
    task_dir = str(root / "task")
    docs = [d for d in json.load(open(os.path.join(task_dir, "data.json"))) if d["kind"] == "video"][:3]
    for args, options in [
        ({"x2l": "low=2;high=8;k=1;oracle=uniform"}, {"x2l": X2LConfig(low=2, high=8, k=1, oracle="uniform")}),
        ({"schedule": "per-window:ratios=2"}, {"schedule": schedules.parse("per-window:ratios=2")}),
    ]:
        model = VXLJax(pretrained=str(root / "ckpt"), max_frames_num=4, strict=True, batch_size=2, **args)
        model.restore_compilation_cache()
        visual = [{"visual": [os.path.join(task_dir, d["visual"])], "q": d["question"]} for d in docs]
        got = model.generate_until(_requests(model, visual, {"max_new_tokens": 6, "until": ["\n\n"]}))
        for d, text in zip(docs, got):
            assert text.strip() == _expected(model.answerer, task_dir, d, d["question"], max_new_tokens=6,
                                             **options), args
