"""Rewards: docs/ORIGINAL.md §2's outcome table, edge cases, the registry and the safety checks."""

import math
import random
import sys
import textwrap

import pytest
import torch

from tinyr1.errors import RewardError
from tinyr1.rewards import (
    REWARDS,
    accuracy,
    agreement,
    compute_rewards,
    format,
    format_strict,
    length,
    r1,
    resolve_rewards,
)


def fmt(think: str, answer: str, sep: str = " ") -> str:
    return f"<think>{think}</think>{sep}<answer>{answer}</answer>"


def expected_f(think: str) -> float:
    return 0.5 + 0.5 * min(len(think.strip()) / 1200, 1.0)


# (completion, solution letter, expected r1, expected accuracy, expected format)
SHORT, LONG, HUGE = "The man lifts the cup.", "x" * 600, "y" * 5000
TABLE = [
    (fmt(SHORT, "C"), "C", 1 + expected_f(SHORT), 1.0, expected_f(SHORT)),        # correct, formatted
    (fmt(LONG, "C"), "C", 1.75, 1.0, 0.75),
    (fmt(HUGE, "C"), "C", 2.0, 1.0, 1.0),                                          # capped at 1200 chars
    ("C", "C", 1.0, 1.0, 0.0),                                                     # answer only
    ("<answer>C</answer>", "C", 1.0, 1.0, 0.0),                                    # tag but no think
    (fmt(SHORT, "B"), "C", -expected_f(SHORT), 0.0, expected_f(SHORT)),            # wrong, formatted
    (fmt(HUGE, "B"), "C", -1.0, 0.0, 1.0),
    ("B", "C", -2.0, 0.0, 0.0),                                                    # wrong, unformatted
    ("I think it is C", "C", -2.0, 0.0, 0.0),                                      # first char 'I'
    (fmt(SHORT, "C. pick up"), "C", 1 + expected_f(SHORT), 1.0, expected_f(SHORT)),  # first-character match
    (fmt(SHORT, "c"), "C", -expected_f(SHORT), 0.0, expected_f(SHORT)),            # case-sensitive
    (fmt(SHORT, ""), "C", -expected_f(SHORT), 0.0, expected_f(SHORT)),             # empty answer
    (fmt(SHORT, "  C  "), "C", 1 + expected_f(SHORT), 1.0, expected_f(SHORT)),     # whitespace stripped
    (fmt(SHORT, "C", sep="\n\n"), "C", 1 + expected_f(SHORT), 1.0, expected_f(SHORT)),
    (fmt(SHORT, "C", sep=""), "C", 1 + expected_f(SHORT), 1.0, expected_f(SHORT)),
    # newline inside the answer tag hides it (no DOTALL): the whole text is compared -> wrong
    (fmt(SHORT, "\nC\n"), "C", -expected_f(SHORT), 0.0, expected_f(SHORT)),
    # nested / duplicated tags: format 0; accuracy uses the first <answer>
    ("<think><think>a</think></think> <answer>C</answer>", "C", 1.0, 1.0, 0.0),
    (fmt(SHORT, "C") + " <answer>B</answer>", "C", 1.0, 1.0, 0.0),
    (fmt(SHORT, "B") + fmt(SHORT, "C"), "C", -2.0, 0.0, 0.0),
    # text outside the tags breaks the fullmatch
    ("Sure! " + fmt(SHORT, "C"), "C", 1.0, 1.0, 0.0),
    (fmt(SHORT, "C") + " done", "C", 1.0, 1.0, 0.0),
    ("", "C", -2.0, 0.0, 0.0),
]


@pytest.mark.parametrize(("completion", "letter", "want_r1", "want_acc", "want_fmt"), TABLE)
def test_outcome_table(completion: str, letter: str, want_r1: float, want_acc: float, want_fmt: float) -> None:
    sol = [f"<answer>{letter}</answer>"]
    assert accuracy([completion], solution=sol) == [want_acc]
    assert format([completion]) == pytest.approx([want_fmt], abs=1e-12)
    assert r1([completion], solution=sol) == pytest.approx([want_r1], abs=1e-12)
    # the letter-only `answer` column gives the same result as the paper's `solution`
    assert r1([completion], answer=[letter]) == pytest.approx([want_r1], abs=1e-12)
    assert format_strict([completion]) == [1.0 if want_fmt > 0 else 0.0]


def test_reference_ranges_and_monotone_in_think_length() -> None:
    rng = random.Random(0)
    lengths = sorted(rng.sample(range(0, 2000), 40))
    correct = [r1([fmt("w" * n, "A")], answer=["A"])[0] for n in lengths]
    wrong = [r1([fmt("w" * n, "B")], answer=["A"])[0] for n in lengths]
    assert all(1.5 <= v <= 2.0 for v in correct) and all(-1.0 <= v <= -0.5 for v in wrong)
    assert correct == sorted(correct) and wrong == sorted(wrong, reverse=True)
    assert correct[-1] == 2.0 and correct[0] == pytest.approx(1.5 + 0.5 * lengths[0] / 1200)


def test_conversational_completions() -> None:
    msgs = [[{"role": "assistant", "content": fmt(SHORT, "A")}]]
    assert r1(msgs, answer=["A"]) == r1([fmt(SHORT, "A")], answer=["A"])


def test_missing_truth_column() -> None:
    with pytest.raises(RewardError, match="solution"):
        accuracy(["A"])


def test_length_reward_is_capped() -> None:
    assert length([fmt("a" * 600, "A"), fmt("a" * 5000, "A"), "b" * 120]) == [0.5, 1.0, 0.1]


def test_agreement() -> None:
    opts = [["red", "green", "blue", "yellow"]] * 4
    comps = [
        fmt("The square is red in every frame.", "A"),        # names A's option, answers A
        fmt("The square is red in every frame.", "B"),        # reasoning and letter disagree
        fmt("It is red or maybe green.", "A"),                 # names two options
        "<answer>A</answer>",                                  # no think
    ]
    assert agreement(comps, options=opts) == [1.0, 0.0, 0.0, 0.0]
    problem = ["What colour?\nA. red\nB. green\nC. blue\nD. yellow"] * 4
    assert agreement(comps, problem=problem) == [1.0, 0.0, 0.0, 0.0]


def test_resolve_builtin_and_unknown() -> None:
    funcs = resolve_rewards({"r1": 1.0, "format_strict": 0.5})
    assert [(n, w) for n, w, _ in funcs] == [("r1", 1.0), ("format_strict", 0.5)]
    assert funcs[0][2] is REWARDS["r1"]
    with pytest.raises(RewardError) as err:
        resolve_rewards({"acuracy": 1.0})
    assert "acuracy" in str(err.value) and "accuracy" in str(err.value) and "format_strict" in str(err.value)
    with pytest.raises(RewardError, match="finite"):
        resolve_rewards({"r1": float("nan")})
    with pytest.raises(RewardError, match="empty"):
        resolve_rewards({})


def test_custom_reward_module_imported_only_when_named(tmp_path, monkeypatch) -> None:
    mod = "tinyr1_test_custom_reward_mod"
    (tmp_path / f"{mod}.py").write_text(textwrap.dedent("""
        def brevity(completions, answer, task, **kwargs):
            return [1.0 / (1 + len(c)) + (task[i] == "color") for i, c in enumerate(completions)]
    """))
    assert mod not in sys.modules
    funcs = resolve_rewards({"r1": 1.0, f"{mod}:brevity": 2.0}, [tmp_path])  # from its folder only
    assert mod in sys.modules
    comps = [fmt(SHORT, "A"), "B"]
    cols = {"answer": ["A", "A"], "task": ["color", "count"], "solution": ["<answer>A</answer>"] * 2}
    per, total = compute_rewards(funcs, comps, cols)
    assert per.shape == (2, 2) and total.shape == (2,)
    want_custom = [1 / (1 + len(comps[0])) + 1, 1 / (1 + len(comps[1]))]
    want_r1 = r1(comps, answer=cols["answer"])
    for i in range(2):  # naive weighted sum per completion
        assert per[i, 1].item() == pytest.approx(want_custom[i], rel=1e-6)
        assert total[i].item() == pytest.approx(1.0 * want_r1[i] + 2.0 * want_custom[i], rel=1e-6)
    with pytest.raises(RewardError, match="no callable"):
        resolve_rewards({f"{mod}:nope": 1.0}, [tmp_path])
    with pytest.raises(RewardError, match=r"no tinyr1_no_such_module_xyz.py in the reward folders"):
        resolve_rewards({"tinyr1_no_such_module_xyz:f": 1.0}, [tmp_path])


def _bad(kind: str):
    def fn(completions, **_):
        if kind == "nan":
            return [math.nan] * len(completions)
        if kind == "inf":
            return [0.0] * (len(completions) - 1) + [math.inf]
        if kind == "short":
            return [1.0]
        if kind == "none":
            return None
        if kind == "str":
            return ["x"] * len(completions)
        raise KeyError("solution_text")
    return fn


@pytest.mark.parametrize(("kind", "match"), [
    ("nan", "'mine' returned nan"), ("inf", "'mine' returned inf at index 2"),
    ("short", "'mine' returned 1 values for 3"), ("none", "'mine' must return"),
    ("str", "'mine' returned a non-number"), ("raise", "'mine' raised KeyError"),
])
def test_compute_rewards_rejects_bad_outputs(kind: str, match: str) -> None:
    funcs = [("r1", 1.0, REWARDS["r1"]), ("mine", 1.0, _bad(kind))]
    with pytest.raises(RewardError, match=match):
        compute_rewards(funcs, ["A", "B", "C"], {"answer": ["A", "A", "A"]})


def test_compute_rewards_matches_loop_on_random_inputs() -> None:
    rng = random.Random(1)
    letters = "ABCDE"
    comps, answers = [], []
    for _ in range(64):
        think = "".join(rng.choice("ab .") for _ in range(rng.randint(0, 1500)))
        ans = rng.choice(letters)
        comps.append(rng.choice([fmt(think, ans), ans, fmt(think, ans) + "x", ""]))
        answers.append(rng.choice(letters))
    weights = {"r1": 0.7, "accuracy": 0.2, "format": -0.3, "length": 0.05}
    funcs = resolve_rewards(weights)
    per, total = compute_rewards(funcs, comps, {"answer": answers})
    for i, (c, a) in enumerate(zip(comps, answers)):
        want = 0.0
        for j, (name, w) in enumerate(weights.items()):
            v = REWARDS[name]([c], answer=[a])[0]
            assert per[i, j].item() == pytest.approx(v, abs=1e-6)
            want += w * v
        assert total[i].item() == pytest.approx(want, abs=1e-5)
    assert per.dtype == torch.float32


def test_column_length_mismatch() -> None:
    with pytest.raises(RewardError, match="column 'answer'"):
        compute_rewards(resolve_rewards({"r1": 1.0}), ["A", "B"], {"answer": ["A"]})
