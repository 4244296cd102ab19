"""Evaluation: multiple-choice video QA (MLVU, Video-MME, LongVideoBench, LVBench) and video needle-in-a-haystack.

Both run with any model. niah takes an `answer_fn(frames_u8 [F, H, W, 3], prompt_text) -> str`; mcqa takes
that too (every question from scratch) or an `mcqa.Asker` (encode each video once, ask all its questions on
the encoding: what the CLI passes, built on `Answerer.encode_many` / `Answerer.answer`):

    questions = mcqa.load("MLVU/json")                     # a file or a folder of JSON / JSON Lines files
    asker = mcqa.Asker(lambda frames: answerer.encode_many(frames), lambda pairs: answerer.answer(pairs))
    results = mcqa.run(questions, asker, "MLVU/video", video.uniform(32), batch_videos=1)
    results.summary["accuracy"]

    spec = niah.NiahSpec(lengths=(10, 20, 40), depths=(0, 0.5, 1))
    results = niah.run(answer_fn, spec)
    niah.heatmap(results.table, spec.lengths, spec.depths, "niah_heatmap.png")

Video-MME, MLVU, LongVideoBench and LVBench are prompted and scored as lmms-eval does (`lmms_tasks`).
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
