"""`vxl eval`: answer parsing, MLVU / Video-MME loading, scoring, the needle-in-a-haystack grid, the heat map,
and the command end to end on a tiny random model."""

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from vxl_jax.cli.main import main as vxl
from vxl_jax.data import video
from vxl_jax.data.synthetic import PALETTE
from vxl_jax.eval import lmms_tasks, mcqa, niah
from vxl_jax.eval.mcqa import FormatError, Question, parse_choice

OPTIONS = ["red", "blue", "green", "dark red"]


# ---------------------------------------------------------------- parse_choice

@pytest.mark.parametrize("response, expected", [
    # a letter on its own, any case, any wrapping
    ("B", 1), ("b", 1), ("(B)", 1), ("(b)", 1), ("B.", 1), ("b.", 1), ("[C]", 2), (" D ", 3), ("'C'", 2),
    # after an answer word
    ("Answer: B", 1), ("answer: b", 1), ("The answer is B) blue", 1), ("The answer is (C).", 2),
    ("Best option:(C", 2), ("The correct option is d", 3), ("the answer is b", 1), ("Option A", 0),
    ("The correct answer is: (D) dark red.", 3), ("My choice: C, since it is green", 2),
    # a leading lettered option, as the prompt lists them
    ("(A) red", 0), ("A. red", 0), ("B) blue", 1), ("b) blue", 1), ("C: green", 2), ("B, because it is", 1),
    # one standalone capital letter somewhere
    ("I think C is right", 2), ("In my view, A.", 0), ("A is right", 0), ("Looking closely, the frame shows B", 1),
    # the option's text
    ("blue", 1), ("It is blue.", 1), ("Red.", 0), ("dark red", 3), ("the circle is dark red", 3), ("a cat", None),
    # nothing usable or ambiguous
    ("", None), ("   ", None), ("E", None), ("(F)", None), ("B and C", None), ("A and B", None),
    ("I'm not sure", None), ("the answer is a dog", None), ("A cat", None), ("red or blue", None),
    ("None of these", None), ("(A) or (B)", None),
])
def test_parse_choice(response, expected):
    assert parse_choice(response, OPTIONS) == expected


def test_parse_choice_prefers_the_letter_to_the_text_and_ignores_letters_past_the_options():
    assert parse_choice("B. red", OPTIONS) == 1          # the letter says B even though the text is A's
    assert parse_choice("A", ["x", "y"]) == 0
    assert parse_choice("C", ["x", "y"]) is None          # only two options
    assert parse_choice("Answer: E. red", OPTIONS) == 0   # E is no option; the text still names red
    with pytest.raises(ValueError, match="options"):
        parse_choice("A", [])


def test_prompt_lists_lettered_options_then_the_instruction():
    text = mcqa.prompt("What color is the circle?", ["red", "blue"])
    assert text.splitlines() == ["Question: What color is the circle?", "Options:", "(A) red", "(B) blue",
                                 mcqa.INSTRUCTION]


# ---------------------------------------------------------------- loading

MLVU = [
    {"video": "movie1.mp4", "duration": 246.5, "question": "What happens first?",
     "candidates": ["a dog runs", "a car stops", "it rains", "nothing"], "answer": "a car stops",
     "question_type": "plotQA"},
    {"video": "movie2.mp4", "duration": 30, "question": "How many cats?",
     "candidates": ["1", "2", "3"], "answer": "3", "question_type": "count"},
]

VIDEOMME_FLAT = [
    {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Astronomy",
     "url": "https://example.org/x", "videoID": "fFjv93ACGo8", "question_id": "001-1",
     "task_type": "Counting Problem", "question": "How many planets?",
     "options": ["A. 5.", "B. 6.", "C. 7.", "D. 8."], "answer": "D"},
    {"video_id": "002", "duration": "long", "domain": "Film", "sub_category": "Animation",
     "videoID": "abc", "question_id": "002-1", "task_type": "Object Reasoning", "question": "Who wins?",
     "options": ["A. the cat", "B. the mouse", "C. nobody", "D. both"], "answer": "B"},
]

VIDEOMME_NESTED = [
    {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Astronomy",
     "videoID": "fFjv93ACGo8",
     "questions": [{"question_id": "001-1", "task_type": "Counting Problem", "question": "How many planets?",
                    "options": ["A. 5.", "B. 6.", "C. 7.", "D. 8."], "answer": "D"},
                   {"question_id": "001-2", "task_type": "Action Recognition", "question": "What moves?",
                    "options": ["A. a comet", "B. a moon", "C. a star", "D. a ship"], "answer": "A"}]},
]


def _write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def test_load_mlvu(tmp_path):
    path = _write(tmp_path / "1_plotQA.json", MLVU)
    assert mcqa.detect_layout(MLVU[0]) == "mlvu"
    q = mcqa.load(path)
    assert [x.answer_index for x in q] == [1, 2]
    assert q[0] == Question(id="1_plotQA-0", video="movie1.mp4", question="What happens first?",
                            options=("a dog runs", "a car stops", "it rains", "nothing"), answer_index=1,
                            task_type="plotQA", duration=246.5, source=path, benchmark="mlvu")
    assert q[1].task_type == "count" and q[1].duration == 30.0 and q[1].answer_letter == "C"


def test_load_videomme_flat_and_nested(tmp_path):
    flat = mcqa.load(_write(tmp_path / "flat.json", VIDEOMME_FLAT))
    assert mcqa.detect_layout(VIDEOMME_FLAT[0]) == "videomme"
    assert [(x.id, x.video, x.answer_index, x.task_type, x.duration) for x in flat] == [
        ("001-1", "fFjv93ACGo8.mp4", 3, "Counting Problem", "short"),
        ("002-1", "abc.mp4", 1, "Object Reasoning", "long")]
    assert flat[0].options == ("5.", "6.", "7.", "8.") and flat[1].options[1] == "the mouse"
    nested = mcqa.load(_write(tmp_path / "nested.json", VIDEOMME_NESTED))
    assert mcqa.detect_layout(VIDEOMME_NESTED[0]) == "videomme-nested"
    assert [(x.id, x.video, x.answer_index, x.task_type) for x in nested] == [
        ("001-1", "fFjv93ACGo8.mp4", 3, "Counting Problem"), ("001-2", "fFjv93ACGo8.mp4", 0, "Action Recognition")]
    assert nested[0] == dataclasses.replace(flat[0], source=nested[0].source)


def test_load_a_folder_reads_every_json_file_in_order(tmp_path):
    _write(tmp_path / "2_count.json", MLVU[1:])
    _write(tmp_path / "1_plotQA.json", MLVU[:1])
    assert [q.id for q in mcqa.load(str(tmp_path))] == ["1_plotQA-0", "2_count-0"]


@pytest.mark.parametrize("data, message", [
    ({"video": "x"}, "expected a JSON list"),
    ([], "empty"),
    ([{"video": "x.mp4", "question": "q"}], "record 0 is neither MLVU"),
    ([MLVU[0], {**MLVU[1], "answer": "4"}], r"record 1: the answer '4' is not one of the candidates"),
    ([MLVU[0], {k: v for k, v in MLVU[1].items() if k != "question"}], r"record 1: missing 'question'"),
    ([{k: v for k, v in MLVU[0].items() if k != "answer"}], "record 0: missing 'answer'"),
    ([{**MLVU[0], "candidates": "a, b"}], "record 0: 'candidates' should be"),
    ([{**MLVU[0], "candidates": ["x"], "answer": "x"}], "record 0: .*needs 2 to 26 options"),
    ([VIDEOMME_FLAT[0], {**VIDEOMME_FLAT[1], "answer": "E"}], "record 1: 'answer' should be one of the letters"),
    ([{**VIDEOMME_FLAT[0], "options": ["A. x", "C. y"]}], "record 0: option 1 is lettered 'C'"),
    ([{**VIDEOMME_FLAT[0], "videoID": None, "video_id": None}], "record 0: needs 'videoID' or 'video_id'"),
    ([VIDEOMME_NESTED[0], {**VIDEOMME_NESTED[0], "video_id": "002",
                           "questions": [{"question": "q", "options": ["A. x", "B. y"]}]}],
     "record 1, question 0: missing 'answer'"),
    ([VIDEOMME_FLAT[0], VIDEOMME_FLAT[0]], "question id '001-1' appears more than once"),
    ([MLVU[0], "oops"], "record 1: expected an object"),
])
def test_malformed_annotations_name_the_file_and_record(tmp_path, data, message):
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(FormatError, match=re.escape(path) + ": " + message if "record" in message
                       else message):
        mcqa.load(path)


def test_not_json_and_missing_files_are_clear_errors(tmp_path):
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(FormatError, match="broken.json: not valid JSON"):
        mcqa.load(str(tmp_path / "broken.json"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mcqa.load(str(tmp_path / "nope.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.json"):
        mcqa.load(str(tmp_path / "empty"))


# ---------------------------------------------------------------- scoring and running

def _synthetic_set(tmp_path):
    """Ten MLVU questions over three small videos (two task types); MLVU's per-task video folder."""
    folder = tmp_path / "video" / "tasks"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(3):
        video.write_test_video(folder / f"v{k}.mp4", rng.integers(0, 255, (6, 64, 64, 3), dtype=np.uint8), fps=4)
    records = []
    for i in range(10):
        candidates = [f"thing {i} {c}" for c in "wxyz"]
        records.append({"video": f"v{i % 3}.mp4", "duration": 1.5, "question": f"Question number {i}?",
                        "candidates": candidates, "answer": candidates[i % 4],
                        "question_type": "count" if i < 4 else "order"})
    path = _write(tmp_path / "tasks.json", records)
    return mcqa.load(path), str(tmp_path / "video")


# Fake model: right on these questions (in three phrasings), unparseable on 8, wrong on the others.
RIGHT = {0, 1, 2, 5, 9}


def _fake_answer(question: Question) -> str:
    i = int(question.question.split()[2][:-1])
    if i in RIGHT:
        return [f"{question.answer_letter}", f"Answer: ({question.answer_letter})", question.options[question.answer_index]][i % 3]
    if i == 8:
        return "I cannot tell."
    return mcqa.LETTERS[(question.answer_index + 1) % 4]


def test_score_counts_overall_per_task_and_unparsed(tmp_path):
    questions, _ = _synthetic_set(tmp_path)
    predictions = [parse_choice(_fake_answer(q), q.options) for q in questions]
    s = mcqa.score(questions, predictions)
    assert (s["correct"], s["total"], s["unparsed"], s["accuracy"]) == (5, 10, 1, 0.5)
    assert s["by_task_type"] == {
        "count": {"accuracy": 0.75, "correct": 3, "total": 4, "unparsed": 0},
        "order": {"accuracy": 2 / 6, "correct": 2, "total": 6, "unparsed": 1}}
    assert "by_duration" not in s   # MLVU durations are seconds, not categories
    with pytest.raises(ValueError, match="10 questions but 9 predictions"):
        mcqa.score(questions, predictions[:9])


def test_score_by_named_duration(tmp_path):
    questions = mcqa.load(_write(tmp_path / "mme.json", VIDEOMME_FLAT))
    s = mcqa.score(questions, [3, None])
    assert s["by_duration"] == {"long": {"accuracy": 0.0, "correct": 0, "total": 1, "unparsed": 1},
                                "short": {"accuracy": 1.0, "correct": 1, "total": 1, "unparsed": 0}}


def test_run_asks_every_question_about_its_frames(tmp_path):
    questions, root = _synthetic_set(tmp_path)
    assert mcqa.missing_videos(questions, root) == []
    by_prompt = {lmms_tasks.prompt_for(q): q for q in questions}
    assert all(q.benchmark == "mlvu" for q in questions) and len(by_prompt) == len(questions)
    seen, lines = [], []

    def answer_fn(frames, text):
        assert frames.dtype == np.uint8 and frames.shape == (4, 64, 64, 3)
        seen.append(text)
        return _fake_answer(by_prompt[text])

    results = mcqa.run(questions, answer_fn, root, video.uniform(4), lines.append)
    assert sorted(seen) == sorted(by_prompt)   # each asked once, with lmms-eval's MLVU prompt
    # lmms-eval's MLVU extraction: a letter counts, an option's bare text (questions 2 and 5) does not.
    expected = [i in RIGHT - {2, 5} for i in range(10)]
    assert [r.correct for r in results.records] == expected
    assert results.summary["accuracy"] == 0.3 and results.summary["by_task_type"]["count"]["accuracy"] == 0.5
    r8 = results.records[8]
    assert (r8.choice, r8.choice_letter, r8.response, r8.frames) == (None, None, "I cannot tell.", 4)
    lines = [line for line in lines if line.startswith("[")]
    assert len(lines) == 10 and lines[-1].startswith("[10/10] ") and "3/10 right so far" in lines[-1]
    data = json.loads(json.dumps(results.to_json()))
    assert data["summary"]["correct"] == 3 and data["records"][0]["options"] == list(questions[0].options)


def test_run_encodes_each_video_once_and_asks_its_questions_together(tmp_path):
    questions, root = _synthetic_set(tmp_path)
    by_video = {}
    for i, q in enumerate(questions):
        by_video.setdefault(mcqa.resolve_video(q, root), []).append(i)
    assert max(len(v) for v in by_video.values()) > 1       # some video has several questions
    by_prompt = {lmms_tasks.prompt_for(q): q for q in questions}
    encoded, asked = [], []

    def encode(frames):
        encoded.append(len(frames))
        return [("handle", f.sum()) for f in frames]

    def answer(pairs):
        asked.append(len(pairs))
        assert all(h[0] == "handle" for h, _ in pairs)
        return [_fake_answer(by_prompt[p]) for _, p in pairs]

    for batch in (1, 2, 100):
        encoded.clear(), asked.clear()
        results = mcqa.run(questions, mcqa.Asker(encode, answer), root, video.uniform(4), batch_videos=batch)
        assert sum(encoded) == len(by_video) and max(encoded) == min(batch, len(by_video))
        assert sum(asked) == len(questions) and len(asked) == len(encoded)
        assert [r.correct for r in results.records] == [i in RIGHT - {2, 5} for i in range(10)]   # order kept
        assert [r.id for r in results.records] == [q.id for q in questions]


def test_missing_videos_are_listed_before_running(tmp_path):
    questions, root = _synthetic_set(tmp_path)
    gone = tmp_path / "video" / "tasks" / "v1.mp4"
    gone.unlink()
    assert mcqa.missing_videos(questions, root) == [str(tmp_path / "video" / "v1.mp4")]


# ---------------------------------------------------------------- needle in a haystack

SPEC = niah.NiahSpec(lengths=(10, 20), depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials=2, seed=3, size=64)


def test_needle_position_is_round_half_up_of_depth_times_length():
    assert [niah.needle_position(10, d) for d in SPEC.depths] == [0, 3, 5, 8, 10]
    assert [niah.needle_position(20, d) for d in SPEC.depths] == [0, 5, 10, 15, 20]
    with pytest.raises(ValueError, match="depth"):
        niah.needle_position(10, 1.5)


def test_grid_puts_the_needle_at_its_depth_and_is_deterministic():
    cells = niah.grid(SPEC)
    assert len(cells) == 2 * 5 * 2 and cells[0] == niah.Cell(10, 0.0, 0) and cells[-1] == niah.Cell(20, 1.0, 1)
    for cell in cells:
        haystack = niah.haystack_frames(SPEC, cell.length)
        frames, position, needle = niah.cell_video(SPEC, cell, haystack)
        assert position == niah.needle_position(cell.length, cell.depth)
        assert frames.shape == (cell.length + 1, 64, 64, 3) and frames.dtype == np.uint8
        np.testing.assert_array_equal(frames[position], niah.needle_image(needle, 64, 64))
        np.testing.assert_array_equal(np.delete(frames, position, axis=0), haystack)
        assert tuple(frames[position, 32, 32]) == PALETTE[needle.colour]
        assert tuple(frames[position, 0, 0]) == niah.BACKGROUND
        assert needle.options[needle.answer_index] == needle.colour and len(set(needle.options)) == 4
        again, _, needle2 = niah.cell_video(SPEC, cell)
        np.testing.assert_array_equal(again, frames)
        assert needle2 == needle
    # A trial's needle is the same in every cell; other trials and seeds draw others.
    assert niah.make_needle(3, 0) == niah.cell_video(SPEC, cells[0])[2]
    needles = {niah.make_needle(seed, trial) for seed in range(4) for trial in range(4)}
    assert len(needles) > 4 and {n.shape for n in needles} <= set(niah.NEEDLE_SHAPES)


def test_more_needle_frames_and_a_haystack_file(tmp_path):
    path = video.write_test_video(tmp_path / "hay.mp4", np.full((30, 64, 128, 3), 90, np.uint8), fps=8)
    spec = niah.NiahSpec(lengths=(10,), depths=(0.5,), needle_frames=3, haystack=path)
    frames, position, needle = niah.cell_video(spec, niah.Cell(10, 0.5, 0))
    assert frames.shape == (13, 64, 128, 3) and position == 5
    assert all(tuple(frames[k, 32, 64]) == PALETTE[needle.colour] for k in (5, 6, 7))
    assert abs(int(frames[4, 32, 64, 0]) - 90) < 8 and abs(int(frames[8, 32, 64, 0]) - 90) < 8


@pytest.mark.parametrize("bad, message", [(dict(lengths=()), "lengths"), (dict(lengths=(0,)), "lengths"),
                                          (dict(depths=(0.5, 1.2)), "depths"), (dict(trials=0), "trials"),
                                          (dict(num_options=7), "num_options"), (dict(size=8), "size")])
def test_bad_specs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        niah.NiahSpec(**bad)


def _sees_first_half(frames, text):
    """A fake model that finds the needle only in the first half of the video, and says so otherwise."""
    options = re.findall(r"^\(([A-Z])\) (\w+)$", text, re.MULTILINE)
    for k in range(len(frames) // 2 + 1):
        f = frames[k]
        if tuple(f[0, 0]) == niah.BACKGROUND:
            colour = next(name for name, rgb in PALETTE.items() if tuple(f[len(f) // 2, len(f) // 2]) == rgb)
            return f"The answer is ({dict((c, l) for l, c in options)[colour]})."
    return "I did not see it."


def test_niah_run_builds_the_accuracy_table():
    lines = []
    results = niah.run(_sees_first_half, SPEC, lines.append)
    # Visible iff position <= (L + 1) // 2: L = 10 -> positions 0, 3, 5 of 0, 3, 5, 8, 10; L = 20 -> 0, 5, 10.
    assert results.table == ((1.0, 1.0, 1.0, 0.0, 0.0), (1.0, 1.0, 1.0, 0.0, 0.0))
    assert results.summary == {"accuracy": 12 / 20, "correct": 12, "total": 20, "unparsed": 8}
    assert len(lines) == 20 and lines[0].startswith("[1/20] length 10, depth 0 (frame 0), trial 0: ")
    data = json.loads(json.dumps(results.to_json()))
    assert data["table"]["lengths"] == [10, 20] and data["table"]["accuracy"][0] == [1, 1, 1, 0, 0]
    assert data["records"][3]["position"] == 3 and data["spec"]["seed"] == 3
    untimed = lambda records: [dataclasses.replace(r, seconds=0.0) for r in records]  # noqa: E731
    assert untimed(niah.run(_sees_first_half, SPEC).records) == untimed(results.records)   # deterministic
    text = niah.format_table(results.table, SPEC.lengths, SPEC.depths)
    assert text.splitlines()[1].split() == ["10", "1.00", "1.00", "1.00", "0.00", "0.00"]


def test_heatmap_is_a_png(tmp_path):
    table = ((1.0, 0.5, float("nan")), (0.0, 0.25, 1.0))
    path = niah.heatmap(table, (10, 20), (0.0, 0.5, 1.0), str(tmp_path / "map.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    from matplotlib.image import imread
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


# ---------------------------------------------------------------- the command

def test_eval_help_and_input_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        vxl(["eval", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "usage: vxl eval" in out
    for flag in ("--task", "--data", "--video-root", "--lengths", "--depths", "--haystack", "--ratio",
                 "--max-new-tokens"):
        assert flag in out
    assert vxl(["eval", "--task", "mcqa", "--checkpoint", "x", "--out", str(tmp_path)]) == 1
    assert "--task mcqa needs --data" in capsys.readouterr().err
    assert vxl(["eval", "--task", "niah", "--checkpoint", "x", "--out", str(tmp_path), "--frames", "4"]) == 1
    assert "--frames is for --task mcqa" in capsys.readouterr().err
    assert vxl(["eval", "--task", "niah", "--checkpoint", "x", "--out", str(tmp_path), "--depths", "0,2"]) == 1
    assert "depths must be distinct fractions in [0, 1]" in capsys.readouterr().err
    questions, root = _synthetic_set(tmp_path)
    (tmp_path / "video" / "tasks" / "v2.mp4").unlink()
    assert vxl(["eval", "--task", "mcqa", "--checkpoint", "x", "--out", str(tmp_path / "o"),
                "--data", questions[0].source, "--video-root", root]) == 1
    err = capsys.readouterr().err
    assert "1 of the videos" in err and "v2.mp4" in err


def _vxl(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "vxl_jax.cli.main", *argv], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_e2e")
    out = _vxl("tiny-model", str(root / "ckpt"), cwd=root)
    assert out.returncode == 0, out.stderr
    return root


def test_eval_niah_end_to_end(tiny):
    out = _vxl("eval", "--task", "niah", "--checkpoint", "ckpt", "--out", "niah", "--lengths", "10,20",
               "--depths", "0,1", "--max-new-tokens", "4", "--ratio", "4", cwd=tiny)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("[vxl eval] [") == 4 and "length 20, depth 1 (frame 20)" in out.stderr
    assert "accuracy" in out.stdout and "results.json" in out.stdout
    data = json.loads((tiny / "niah" / "results.json").read_text())
    assert data["task"] == "niah" and len(data["records"]) == 4
    assert data["table"]["lengths"] == [10, 20] and data["table"]["depths"] == [0.0, 1.0]
    assert np.array(data["table"]["accuracy"]).shape == (2, 2)
    assert data["config"]["answer_options"]["ratio"] == 4 and data["config"]["answer_options"]["max_new_tokens"] == 4
    assert {r["frames"] for r in data["records"]} == {11, 21}
    assert all(set(r["details"]["ratios"]) == {4} for r in data["records"])
    png = (tiny / "niah" / "niah_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_eval_niah_with_x2l_records_the_reloaded_chunks(tiny):
    out = _vxl("eval", "--task", "niah", "--checkpoint", "ckpt", "--out", "niah_x2l", "--lengths", "20",
               "--depths", "0,1", "--max-new-tokens", "2", "--x2l", "low=2,high=16,k=1", cwd=tiny)
    assert out.returncode == 0, out.stderr
    data = json.loads((tiny / "niah_x2l" / "results.json").read_text())
    assert data["config"]["answer_options"]["x2l"]["high"] == 16
    for r in data["records"]:
        d = r["details"]
        assert d["chunk_frames"] == [[0, 10], [10, 10], [20, 1]] and len(d["selected"]) == 1
        assert d["entries"]["all_high"] < d["entries"]["merged"] < d["entries"]["all_low"]


def test_eval_mcqa_end_to_end(tiny):
    rng = np.random.default_rng(1)
    (tiny / "videos").mkdir()
    for k in range(2):
        video.write_test_video(tiny / "videos" / f"v{k}.mp4", rng.integers(0, 255, (6, 64, 64, 3), np.uint8), fps=4)
    _write(tiny / "videos" / "mme.json", [{**VIDEOMME_FLAT[k], "videoID": f"v{k}"} for k in range(2)])
    out = _vxl("eval", "--task", "mcqa", "--checkpoint", "ckpt", "--out", "mcqa", "--data", "videos/mme.json",
               "--frames", "4", "--max-new-tokens", "3", cwd=tiny)
    assert out.returncode == 0, out.stderr
    assert "[1/2] 001-1 (Counting Problem)" in out.stderr and "[2/2] 002-1" in out.stderr
    data = json.loads((tiny / "mcqa" / "results.json").read_text())
    assert data["task"] == "mcqa" and [r["id"] for r in data["records"]] == ["001-1", "002-1"]
    assert all(r["frames"] == 4 and isinstance(r["response"], str) for r in data["records"])
    assert data["summary"]["total"] == 2 and set(data["summary"]["by_task_type"]) == {"Counting Problem",
                                                                                       "Object Reasoning"}
    assert data["config"]["frames"] == 4 and data["config"]["data"] == "videos/mme.json"
