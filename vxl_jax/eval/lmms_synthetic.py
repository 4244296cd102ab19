"""A local lmms-eval task over generated videos and images with known answers (multiple choice).

    python -m vxl_jax.eval.lmms_synthetic OUT_DIR [--videos 2] [--images 2]

writes OUT_DIR/{vxl_synthetic_mc.yaml, utils.py, data.json, synthetic/videos/*.mp4, images/*.png} and prints
the lmms-eval command that runs it (`--include_path OUT_DIR --tasks vxl_synthetic_mc`): nothing is downloaded,
so it checks the `vxl_jax` model end to end offline. The videos are the synthetic QA set's
(`vxl_jax.data.synthetic`: first/last-frame colour and shape questions, three per video, so several questions
share a video); each image is a video's first frame with a shape question, half of them given to the model as
PIL images and half as paths. The metric is `accuracy` (the option letter at the start of the answer).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

TASK = "vxl_synthetic_mc"

_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer with the option's letter from the given choices directly."
metadata:
  - version: 0.0
"""

_UTILS = '''\
"""doc_to_visual / doc_to_text / process_results of the generated vxl_synthetic_mc task."""

import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    path = os.path.join(HERE, doc["visual"])
    if doc["kind"] == "image_pil":
        from PIL import Image
        return [Image.open(path).convert("RGB")]
    return [path]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    options = "\\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(doc["options"]))
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}\\n{options}{kwargs.get('post_prompt', '')}"


def process_results(doc, results):
    letters = "".join(chr(65 + i) for i in range(len(doc["options"])))
    m = re.match(rf"\\s*\\(?([{letters}])\\b", results[0])
    return {"accuracy": float(bool(m) and m.group(1) == doc["answer"])}
'''


def _options(rng: np.random.Generator, answer: str, pool: list[str], n: int) -> tuple[list[str], str]:
    others = [c for c in pool if c != answer]
    chosen = [answer] + [others[i] for i in rng.permutation(len(others))[:n - 1]]
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    return chosen, chr(65 + chosen.index(answer))


def write_synthetic_task(out_dir: str, *, videos: int = 2, images: int = 2, size: int = 64, frames: int = 8,
                         seed: int = 0, max_new_tokens: int = 8) -> str:
    """Writes the task folder (see the module doc); returns the YAML's path. `images` <= `videos`."""
    from PIL import Image

    from vxl_jax.data import records, synthetic, video

    if videos < 1 or not 0 <= images <= videos:
        raise ValueError(f"need videos >= 1 and 0 <= images <= videos, got {videos}, {images}")
    out_dir = os.path.abspath(out_dir)
    data_root = os.path.join(out_dir, "synthetic")
    spec = synthetic.SyntheticSpec(num_records=3 * videos, num_eval=0, frames=frames, size=size, seed=seed)
    synthetic.generate(data_root, spec)
    rows, shapes = [], {}
    for k, rec in enumerate(records.load_annotations(os.path.join(data_root, "train.jsonl"))):
        rng = np.random.default_rng((seed, k))
        kind = rec["question_type"]
        pool = list(synthetic.SHAPES) if kind == "shape" else list(synthetic.PALETTE)
        options, letter = _options(rng, rec["answer"], pool, len(pool) if kind == "shape" else 4)
        if kind == "shape":
            shapes[rec["video"]] = rec["answer"]
        rows.append({"id": rec["id"], "kind": "video", "visual": os.path.join("synthetic", rec["video"]),
                     "question": synthetic.QUESTIONS[kind], "options": options, "answer": letter,
                     "answer_text": rec["answer"]})
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    for k, rel in enumerate(sorted(shapes)[:images]):
        first = video.read(os.path.join(data_root, rel), video.uniform(1)).frames[0]
        name = os.path.join("images", f"{k:03d}.png")
        Image.fromarray(first).save(os.path.join(out_dir, name))
        options, letter = _options(np.random.default_rng((seed, 1000 + k)), shapes[rel], list(synthetic.SHAPES), 2)
        rows.append({"id": f"image-{k:03d}", "kind": "image_pil" if k % 2 == 0 else "image", "visual": name,
                     "question": "What shape is in the image?", "options": options, "answer": letter,
                     "answer_text": shapes[rel]})
    data = os.path.join(out_dir, "data.json")
    with open(data, "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out_dir, "utils.py"), "w") as f:
        f.write(_UTILS)
    path = os.path.join(out_dir, f"{TASK}.yaml")
    with open(path, "w") as f:
        f.write(_YAML.format(task=TASK, data=json.dumps(data), max_new_tokens=max_new_tokens))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vxl_jax.eval.lmms_synthetic", description=__doc__.split("\n\n")[1])
    p.add_argument("out_dir")
    p.add_argument("--videos", type=int, default=2, help="generated videos, three questions each (default 2)")
    p.add_argument("--images", type=int, default=2, help="image questions, one per video (default 2)")
    args = p.parse_args(argv)
    path = write_synthetic_task(args.out_dir, videos=args.videos, images=args.images)
    with open(os.path.join(args.out_dir, "data.json")) as f:
        n = len(json.load(f))
    print(f"wrote {path} ({n} questions). Run:\n"
          f"  python -m lmms_eval --model vxl_jax --model_args pretrained=CHECKPOINT,max_frames_num=8 "
          f"--tasks {TASK} --include_path {os.path.abspath(args.out_dir)} --batch_size 4 --log_samples "
          f"--output_path OUT")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
