"""lmms-eval parity for `vxl eval`: the prompts and answer extraction of Video-MME, MLVU dev, LongVideoBench and
LVBench (`eval/lmms_tasks.py`), and the annotation layouts of those benchmarks (`eval/mcqa.py`).

Every expected value here is worked out by hand from lmms-eval's rules (commit 75571cfe0fa3, = v0.7.2 for these
tasks), not from our implementation; pure Python, no JAX.
"""

import json

import pytest

from vxl_jax.eval import lmms_tasks, mcqa
from vxl_jax.eval.mcqa import FormatError, Question

OPTIONS = ("red", "blue", "green", "dark red")
MCQ_BENCHMARKS = ("videomme", "mlvu", "lvbench")   # the ones on lmms-eval's shared extract_mcq_answer


def _q(benchmark: str, options=OPTIONS, **kw) -> Question:
    return Question(id="q", video="v.mp4", question="What colour?", options=tuple(options), answer_index=0,
                    task_type="t", benchmark=benchmark, **kw)


def _letter(choice):
    return None if choice is None else mcqa.LETTERS[choice]


# ---------------------------------------------------------------- extraction: Video-MME, MLVU, LVBench

@pytest.mark.parametrize("response, expected", [
    # the ordering questions' options: a leading letter, then bracketed lowercase labels
    ("C. (c)(b)(d)(a).", "C"), ("B. (b)(a)(c)(d)", "B"),
    # a letter alone, wrapped, or with punctuation stripped from the ends
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("'C'", "C"), ('"D".', "D"), ("  A  ", "A"), ("B)", "B"),
    # answer phrases
    ("The best answer is B", "B"), ("The best answer is: B.", "B"), ("The answer is (C).", "C"),
    ("I think the answer is C because of the hat", "C"), ("Answer: (B) blue", "B"), ("选C", "C"),
    ("Best option:(C", "C"), ("<think>A looks right</think>The answer is D", "D"),
    # first character beats last; a later letter beats an earlier one of the same rank
    ("B and C", "B"), ("A and B", "A"), ("(A) or (B)", "B"), ("The answer is B. A is wrong", "A"),
    # "A" before a word is still the first character
    ("A cat", "A"),
    # no shape matched: any capital A-D anywhere, the last one
    ("Dog", "D"), ("Apple", "A"), ("CD", "D"),
    ("Based on the video, C", "C"),
    # lower case, option text, letters past D, nothing: no answer
    ("b", None), ("(b) blue", None), ("The correct option is d", None), ("blue", None), ("It is dark red.", None),
    ("E", None), ("Option E", None), ("", None), ("   ", None), ("I'm not sure", None),
])
@pytest.mark.parametrize("benchmark", MCQ_BENCHMARKS)
def test_mcq_extraction(benchmark, response, expected):
    assert _letter(lmms_tasks.choice_for(_q(benchmark), response)) == expected


def test_mcq_extraction_never_reads_past_d_and_drops_letters_past_the_options():
    five = OPTIONS + ("pink",)
    assert lmms_tasks.choice_for(_q("videomme", five), "E") is None      # choices are A-D whatever the count
    assert lmms_tasks.mcq_letter("E") == "" and lmms_tasks.mcq_letter("E", "ABCDE") == "E"
    three = OPTIONS[:3]
    assert lmms_tasks.mcq_letter("D") == "D"                             # lmms-eval reads D (never right) ...
    assert lmms_tasks.choice_for(_q("mlvu", three), "D") is None         # ... so it is no option here


def test_reasoning_blocks_are_stripped_as_lmms_eval_does():
    strip = lmms_tasks.strip_reasoning
    assert strip("<think>x</think> B ") == "B"
    assert strip("thinking about A ... </think>\nC") == "C"               # a pre-filled opening tag
    assert strip("<think>never closed B") == "<think>never closed B"
    assert strip("<analysis>A</analysis><think>B</think>D") == "D"
    assert strip("</think>A<think>") == "</think>A<think>"               # closing before opening: kept


# ---------------------------------------------------------------- extraction: LongVideoBench

@pytest.mark.parametrize("response, expected", [
    ("C. (c)(b)(d)(a).", "C"), ("B", "B"), ("(B) blue", "B"), ("The best answer is B", "B"),
    ("Best option: (C", "C"), ("The correct answer is D.", "D"),
    # the first capital A-E anywhere, inside words too
    ("The answer is B. A is wrong", "B"), ("Answer: D) dark red", "A"), ("Based on the video, C", "B"),
    ("Correct answer: B", "C"), ("The Answer is C", "A"), ("A cat", "A"), ("Dog", "D"),
    # lower case, option text, nothing: lmms-eval guesses at random, which is no answer here
    ("b", None), ("blue", None), ("", None), ("the correct option is d", None),
    ("<think>B</think>none of them", None),
])
def test_longvideobench_extraction(response, expected):
    assert _letter(lmms_tasks.choice_for(_q("longvideobench"), response)) == expected


def test_longvideobench_reads_e_only_with_a_fifth_option():
    assert lmms_tasks.choice_for(_q("longvideobench", OPTIONS + ("pink",)), "E") == 4
    assert lmms_tasks.choice_for(_q("longvideobench"), "E") is None


# ---------------------------------------------------------------- the generic fallback

def test_generic_questions_keep_the_video_xl_prompt_and_parser():
    q = _q("generic")
    assert lmms_tasks.prompt_for(q) == mcqa.prompt(q.question, q.options)
    for response in ("C. (c)(b)(d)(a).", "blue", "b", "A cat", "Answer: B"):
        assert lmms_tasks.choice_for(q, response) == mcqa.parse_choice(response, q.options)
    with pytest.raises(ValueError, match="no lmms-eval rules for benchmark 'mvbench'"):
        lmms_tasks.choice_for(_q("mvbench"), "A")


# ---------------------------------------------------------------- annotation files

def _write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def _write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


VIDEOMME = {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Astronomy",
            "url": "https://example.org/x", "videoID": "fFjv93ACGo8", "question_id": "001-1",
            "task_type": "Counting Problem", "question": "How many planets?",
            "options": ["A. 5.", "B. 6.", "C. 7.", "D. 8."], "answer": "D"}

MLVU = {"video": "movie1.mp4", "duration": 246.5, "question": "What happens first?",
        "candidates": ["a dog runs", "a car stops", "it rains", "nothing"], "answer": "a car stops",
        "question_type": "plotQA"}

MLVU_DEV = {"video_name": "movie1.mp4", "duration": 246.5,
            "question": "What happens first?\n(A) a dog runs\n(B) a car stops\n(C) it rains\n(D) nothing\n",
            "candidates": ["a dog runs", "a car stops", "it rains", "nothing"], "answer": "B",
            "task_type": "plotQA", "question_id": "Q0"}

LVB = {"video_id": "86CxyhFV9MI", "question": "Which subtitles appear with the man on stage?",
       "question_wo_referring_query": "Which subtitles appear?",
       "candidates": ["promise has come", "run away", "in front of our crown", "captain of the godson"],
       "correct_choice": 1, "position": [854, 948, 1373], "topic_category": "NP-News-Programs",
       "question_category": "TOS", "level": "L2-Relation", "id": "86CxyhFV9MI_0", "video_path": "86CxyhFV9MI.mp4",
       "subtitle_path": "86CxyhFV9MI_en.json", "duration_group": 600, "starting_timestamp_for_subtitles": 0,
       "duration": 190.16, "view_count": 259852}

LVB_PARQUET = {**{k: v for k, v in LVB.items() if k != "candidates"}, "id": "86CxyhFV9MI_1",
               "option0": "yes", "option1": "no", "option2": "maybe", "option3": "N/A", "option4": "N/A",
               "correct_choice": 2, "duration_group": 60.0}

LVBENCH_QA = {"uid": "1001", "question": "What year is shown on the sign?\n(A) 2010\n(B) 2012\n(C) 2014\n(D) 2016",
              "answer": "C", "question_type": ["key information retrieval", "entity recognition"],
              "time_reference": "00:15-00:19"}

LVBENCH_VIDEO = {"key": "abcdEFGH123", "type": "documentary",
                 "video_info": {"duration_minutes": 65.5, "fps": 30.0}, "qa": [
                     LVBENCH_QA,
                     {"uid": "1002", "question": "Who speaks first?\n(A) a boy\n(B) a girl\n(C) a dog\n(D) nobody",
                      "answer": "(A)", "question_type": ["event understanding"], "time_reference": ""}]}


def test_videomme_prompt_is_lmms_evals(tmp_path):
    q, = mcqa.load(_write(tmp_path / "mme.json", [VIDEOMME]))
    assert (q.benchmark, q.options, q.raw_options) == ("videomme", ("5.", "6.", "7.", "8."),
                                                       ("A. 5.", "B. 6.", "C. 7.", "D. 8."))
    assert lmms_tasks.prompt_for(q) == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\n"
        "How many planets?\nA. 5.\nB. 6.\nC. 7.\nD. 8.\n\n"
        "Answer with the option's letter from the given choices directly.")
    nested, = mcqa.load(_write(tmp_path / "nested.json", [{
        **{k: VIDEOMME[k] for k in ("video_id", "duration", "videoID")},
        "questions": [{k: VIDEOMME[k] for k in ("question_id", "task_type", "question", "options", "answer")}]}]))
    assert lmms_tasks.prompt_for(nested) == lmms_tasks.prompt_for(q)


def test_mlvu_prompt_from_either_layout(tmp_path):
    expected = ("What happens first?\n(A) a dog runs\n(B) a car stops\n(C) it rains\n(D) nothing\n"
                "\nOnly give the best option.\nBest option: (")
    original, = mcqa.load(_write(tmp_path / "1_plotQA.json", [MLVU]))
    assert (original.benchmark, original.raw_question, original.answer_index) == ("mlvu", None, 1)
    assert lmms_tasks.prompt_for(original) == expected
    assert mcqa.detect_layout(MLVU_DEV) == "mlvu"
    dev, = mcqa.load(_write(tmp_path / "mlvu_dev.json", [MLVU_DEV]))
    assert dev == Question(id="plotQA/Q0", video="movie1.mp4", question="What happens first?",
                           options=("a dog runs", "a car stops", "it rains", "nothing"), answer_index=1,
                           task_type="plotQA", duration=246.5, source=dev.source, benchmark="mlvu",
                           raw_question=MLVU_DEV["question"])
    assert lmms_tasks.prompt_for(dev) == expected


def test_longvideobench_layouts_and_prompt(tmp_path):
    assert mcqa.detect_layout(LVB) == mcqa.detect_layout(LVB_PARQUET) == "longvideobench"
    q, = mcqa.load(_write(tmp_path / "lvb_val.json", [LVB]))
    assert q == Question(id="86CxyhFV9MI_0", video="86CxyhFV9MI.mp4", question=LVB["question"],
                         options=tuple(LVB["candidates"]), answer_index=1, task_type="TOS", duration="600",
                         source=q.source, benchmark="longvideobench")
    assert lmms_tasks.prompt_for(q) == (
        "Which subtitles appear with the man on stage?\nA. promise has come\nB. run away\n"
        "C. in front of our crown\nD. captain of the godson\n"
        "Answer with the option's letter from the given choices directly.\n")
    # The HF parquet as JSON Lines: "N/A" padding is no option; the duration group names the duration.
    p, = mcqa.load(_write_lines(tmp_path / "validation.jsonl", [LVB_PARQUET]))
    assert (p.options, p.answer_index, p.duration) == (("yes", "no", "maybe"), 2, "60")
    assert lmms_tasks.prompt_for(p).startswith(LVB["question"] + "\nA. yes\nB. no\nC. maybe\nAnswer with")
    s = mcqa.score([q, p], [1, None])
    assert s["by_duration"]["600"]["correct"] == 1 and s["by_task_type"]["TOS"]["total"] == 2


def test_longvideobench_test_file_without_answers_is_refused(tmp_path):
    no_answer = {k: v for k, v in LVB.items() if k != "correct_choice"}
    assert mcqa.detect_layout(no_answer) == "longvideobench"
    with pytest.raises(FormatError, match="record 0: missing 'correct_choice' .*validation set"):
        mcqa.load(_write(tmp_path / "lvb_test_wo_gt.json", [no_answer]))


def test_lvbench_native_jsonl(tmp_path):
    path = _write_lines(tmp_path / "video_info.meta.jsonl", [LVBENCH_VIDEO])
    assert mcqa.detect_layout(LVBENCH_VIDEO) == "lvbench-nested"
    q1, q2 = mcqa.load(path)
    assert q1 == Question(id="1001", video="abcdEFGH123.mp4", question="What year is shown on the sign?",
                          options=("2010", "2012", "2014", "2016"), answer_index=2,
                          task_type="key information retrieval, entity recognition", duration=65.5 * 60,
                          source=path, benchmark="lvbench", raw_question=LVBENCH_QA["question"],
                          categories=("key information retrieval", "entity recognition"))
    assert (q2.answer_index, q2.categories) == (0, ("event understanding",))
    assert lmms_tasks.prompt_for(q1) == ("What year is shown on the sign?\n(A) 2010\n(B) 2012\n(C) 2014\n(D) 2016"
                                         "\nAnswer the question with the option letter")
    s = mcqa.score([q1, q2], [2, 1])
    assert s["by_category"] == {
        "entity recognition": {"accuracy": 1.0, "correct": 1, "total": 1, "unparsed": 0},
        "event understanding": {"accuracy": 0.0, "correct": 0, "total": 1, "unparsed": 0},
        "key information retrieval": {"accuracy": 1.0, "correct": 1, "total": 1, "unparsed": 0}}


def test_lvbench_flat_and_options_apart(tmp_path):
    flat = {**LVBENCH_QA, "key": "abcdEFGH123", "video_path": "videos/abcdEFGH123.mp4"}
    assert mcqa.detect_layout(flat) == "lvbench"
    q, = mcqa.load(_write(tmp_path / "lvbench.json", [flat]))
    assert (q.video, q.options, q.answer_index, q.duration) == ("videos/abcdEFGH123.mp4",
                                                                ("2010", "2012", "2014", "2016"), 2, None)
    apart = {**flat, "question": "What year is shown on the sign?", "options": ["2010", "2012", "2014", "2016"]}
    assert mcqa.detect_layout(apart) == "lvbench"
    a, = mcqa.load(_write(tmp_path / "apart.json", [apart]))
    assert lmms_tasks.prompt_for(a) == lmms_tasks.prompt_for(q) == (
        "What year is shown on the sign?\n(A) 2010\n(B) 2012\n(C) 2014\n(D) 2016"
        "\nAnswer the question with the option letter")


def test_a_folder_reads_json_and_jsonl(tmp_path):
    _write_lines(tmp_path / "b.jsonl", [LVBENCH_VIDEO])
    _write(tmp_path / "a.json", [LVB])
    assert [q.id for q in mcqa.load(str(tmp_path))] == ["86CxyhFV9MI_0", "1001", "1002"]


@pytest.mark.parametrize("data, message", [
    ([{**LVB, "correct_choice": 4}], "record 0: 'correct_choice' 4 is not one of the 4 options"),
    ([{**LVBENCH_QA, "video_path": "v.mp4", "question": "No options here?"}],
     "record 0: the question has no '\\(A\\) ...' option"),
    ([{**LVBENCH_QA, "key": "v", "answer": "E"}], "record 0: 'answer' should be one of the letters ABCD"),
    ([LVBENCH_QA], "record 0: needs 'video_path', 'video' or 'key'"),
    ([{**LVBENCH_VIDEO, "qa": [LVBENCH_QA, "oops"]}], "record 0, question 1: expected an object"),
    ([{**MLVU_DEV, "answer": "a car stops"}], "record 0: 'answer' should be one of the letters"),
])
def test_malformed_annotations_name_the_record(tmp_path, data, message):
    with pytest.raises(FormatError, match=message):
        mcqa.load(_write(tmp_path / "bad.json", data))


def test_broken_json_lines_name_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(LVBENCH_VIDEO) + "\n{oops\n")
    with pytest.raises(FormatError, match="bad.jsonl: line 2: not valid JSON"):
        mcqa.load(str(tmp_path / "bad.jsonl"))


def test_lvbench_with_lettered_candidates(tmp_path):
    """LVBench's candidates layout: options already lettered "(A) ...", the answer one of them (or its letter),
    question_type a list; not MLVU (whose candidates are bare texts and question_type a string)."""
    base = {"video": "abcdEFGH123.mp4", "question": "What year is shown on the sign?",
            "candidates": ["(A) 2010", "(B) 2012", "(C) 2014", "(D) 2016"], "answer": "(C) 2014",
            "question_type": ["key information retrieval"]}
    records = [base, {**base, "answer": "C"}, {**base, "answer": "2014"},
               {**base, "question_type": "key information retrieval"},                     # lettered is enough
               {**base, "question": base["question"] + "\n(A) 2010\n(B) 2012\n(C) 2014\n(D) 2016"}]
    assert all(mcqa.detect_layout(r) == "lvbench" for r in records)
    assert mcqa.detect_layout({**base, "candidates": ["2010", "2012"], "answer": "2012",
                               "question_type": "count"}) == "mlvu"
    questions = mcqa.load(_write(tmp_path / "lvbench_candidates.json", records))
    expected = ("What year is shown on the sign?\n(A) 2010\n(B) 2012\n(C) 2014\n(D) 2016"
                "\nAnswer the question with the option letter")
    for q in questions:
        assert (q.benchmark, q.options, q.answer_index, q.video) == ("lvbench", ("2010", "2012", "2014", "2016"),
                                                                    2, "abcdEFGH123.mp4")
        assert lmms_tasks.prompt_for(q) == expected
        assert lmms_tasks.choice_for(q, "C. (c)(b)(d)(a).") == 2
    with pytest.raises(FormatError, match="'answer' should be one of the letters"):
        mcqa.load(_write(tmp_path / "bad.json", [{**base, "answer": "(E) 2018"}]))
