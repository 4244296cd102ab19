"""The host window plan: VST counts and positions as the original places them, and the carry rule."""

import json

import numpy as np
import pytest

from vxl_jax.compress.plan import PlanError, make_plan

VST_ID = 513  # the fixtures' id for a VST (vocabulary size after the reference's resize)


@pytest.mark.parametrize("case", ["r4_25f", "r2_10f"])
def test_plan_matches_the_original_interleaving(fixtures, case):
    meta = json.loads((fixtures / case / "meta.json").read_text())
    expected = np.load(fixtures / case / "expected.npz")
    inputs = np.load(fixtures / case / "inputs.npz")
    prefix = int(inputs["beacon_skip_first"])
    visual = int(inputs["beacon_skip_last"]) - prefix
    suffix = inputs["expanded_input_ids"].shape[1] - prefix - visual
    ratio = meta["beacon_ratio"]
    plan = make_plan(prefix, visual, suffix, [ratio] * -(-visual // 1440))
    assert [0, *plan.vst_per_window, 0] == list(expected["all_beacon_sizes"])
    for k, window in enumerate(plan.windows, start=1):
        fed = expected[f"step{k}_input_ids"]
        np.testing.assert_array_equal(window.interleaved() == -1, fed == VST_ID)
    assert plan.memory_after_prefill == prefix + plan.num_vst + suffix


def test_carry_rule_on_windows_that_are_not_multiples_of_the_ratio():
    # 1440 + 1440 + 100 raw tokens at r = 32: 1440 = 45*32, so the carry only appears in the last window.
    plan = make_plan(3, 2980, 5, [32, 32, 32])
    assert plan.vst_per_window == [45, 45, 3] and plan.windows[2].vst_after == (32, 64, 96)
    # r = 7 on windows of 10: carry 3, then the first VST comes after 7 - 3 = 4 raw tokens.
    plan = make_plan(0, 25, 0, [7, 7, 7], window=10)
    assert [w.carry_in for w in plan.windows] == [0, 3, 6]
    assert [w.vst_after for w in plan.windows] == [(7,), (4,), (1,)]
    for w in plan.windows:
        assert w.num_vst == (w.raw + w.carry_in) // w.ratio


def test_a_ratio_change_restarts_the_carry():
    # 10 tokens at r = 7 leave 3; at r = 2 that remainder would owe VSTs before the window starts.
    plan = make_plan(0, 29, 0, [7, 2, 2], window=10, lengths=[10, 9, 10])
    assert [w.carry_in for w in plan.windows] == [0, 0, 1]
    assert [w.vst_after for w in plan.windows] == [(7,), (2, 4, 6, 8), (1, 3, 5, 7, 9)]
    for w in plan.windows:
        assert w.num_vst <= -(-10 // w.ratio)


def test_mixed_ratios_and_interleaving():
    plan = make_plan(2, 12, 1, [2, 4], window=8)
    assert plan.vst_per_window == [4, 1]
    np.testing.assert_array_equal(plan.windows[0].interleaved(), [0, 1, -1, 2, 3, -1, 4, 5, -1, 6, 7, -1])
    np.testing.assert_array_equal(plan.windows[1].interleaved(), [0, 1, 2, 3, -1])


def test_bad_schedules_are_refused_with_a_reason():
    with pytest.raises(PlanError, match="integers >= 1 \\(or None for no compression\\), got \\[0\\]"):
        make_plan(14, 1440, 16, [0])
    with pytest.raises(PlanError, match="got \\[-4, 2.5\\]"):
        make_plan(14, 2881, 16, [-4, 2.5, 4])
    with pytest.raises(PlanError, match="make 2 window\\(s\\) of 1440, but the schedule gives 1"):
        make_plan(14, 1441, 16, [4])


def test_uncompressed_windows_keep_every_raw_token_and_restart_the_carry():
    plan = make_plan(3, 25, 2, [7, None, 7], window=10)
    assert plan.kept_per_window == [1, 10, 0]
    assert [w.carry_in for w in plan.windows] == [0, 0, 0]   # a change of ratio (here to None) drops the carry
    assert plan.memory_after_prefill == 3 + 11 + 2
    np.testing.assert_array_equal(plan.windows[1].interleaved(), np.arange(10))
