"""Evaluation: multiple-choice video QA (MLVU, Video-MME) and video needle-in-a-haystack.

Both take an `answer_fn(frames_u8 [F, H, W, 3], prompt_text) -> str`, so they
run with any model (the CLI passes `Answerer.ask_frames`, the tests a fake):

    questions = mcqa.load("MLVU/json")                     # a file or a folder of JSON files
    results = mcqa.run(questions, answer_fn, "MLVU/video", video.uniform(32))
    results.summary["accuracy"]

    spec = niah.NiahSpec(lengths=(10, 20, 40), depths=(0, 0.5, 1))
    results = niah.run(answer_fn, spec)
    niah.heatmap(results.table, spec.lengths, spec.depths, "niah_heatmap.png")
"""

from __future__ import annotations

import json
import os


def write_json(path: str, data: dict) -> str:
    """Writes `data` atomically (a reader never sees half a file); non-JSON values go through str()."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path
