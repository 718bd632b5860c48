"""The math verifier on cases of each kind it rules on: correct answers in every form score 1.0,
the ways to score without the answer score 0.0. Each list is scored in one batch through the
verifier's workers (math-verify takes tens of milliseconds a case)."""

import math

import pytest

from real_megatron.rewards import math_rewards
from real_megatron.rewards.answers import claims, extract_answer, normalize_numbers, truth_strings

CORRECT = [
    # plain boxes, symbolic equality
    ("The answer is \\boxed{4}.", "4"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac34"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{\\pi}", "\\pi"),
    ("\\boxed{-7}", "-7"),
    ("\\boxed{(2, 3)}", "(2,3)"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("\\boxed{3}", ["three", "3"]),
    ("\\boxed{3}", 3),
    ("\\boxed{0.25}", 0.25),
    ("\\fbox{9}", "9"),
    ("\\boxed {7}", "7"),
    ("\\boxed\n{11}", "11"),
    ("a first try \\boxed{1}, then the answer: \\boxed{\\frac{1}{2}}", "\\frac12"),
    ("\\boxed{\\boxed{5}}", "5"),
    # \boxed followed by a token
    ("\\boxed 4", "4"),
    ("so $\\boxed 12$.", "12"),
    ("\\boxed 42.", "42"),
    ("\\boxed \\pi", "\\pi"),
    # reasoning closed, the answer after it
    ("<think>maybe \\boxed{3}</think> The answer is \\boxed{4}", "4"),
    # equations whose left side is a variable: the right side
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{x=-2}", "-2"),
    ("\\boxed{a_1 = 3}", "3"),
    ("\\boxed{a_{10} = 19}", "19"),
    ("\\boxed{n = 12}", "12"),
    ("\\boxed{AB = 7}", "7"),
    ("\\boxed{\\theta = \\frac{\\pi}{4}}", "\\frac{\\pi}{4}"),
    ("\\boxed{\\text{Area} = 12}", "12"),
    ("\\boxed{f(x) = 2x + 1}", "2x+1"),
    ("\\boxed{x \\approx 2.5}", "2.5"),
    ("\\boxed{x = \\frac{10}{2} = 5}", "5"),
    ("\\boxed{x = 2, y = 3}", "2, 3"),
    # equations between values: every side equals the answer
    ("\\boxed{2 + 2 = 4}", "4"),
    ("\\boxed{\\frac{6}{3} = 2}", "2"),
    # the ground truth is an equation: equations compared
    ("\\boxed{y = 2x + 3}", "y=2x+3"),
    ("\\boxed{x^2 + y^2 = 1}", "x^2+y^2=1"),
    # number forms
    ("\\boxed{8.7e8}", "870000000"),
    ("\\boxed{870000000}", "8.7\\times 10^{8}"),
    ("\\boxed{8.7 \\times 10^{8}}", "870000000"),
    ("\\boxed{1.5e-3}", "0.0015"),
    ("\\boxed{2E5}", "200000"),
    ("\\boxed{1e1}", "10"),
    ("\\boxed{6.02e23}", "6.02\\times10^{23}"),
    ("\\boxed{2.5 \\cdot 10^{-3}}", "0.0025"),
    ("\\boxed{1 000}", "1000"),
    ("\\boxed{1\\,000}", "1000"),
    ("\\boxed{12 345 678}", "12345678"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{1{,}000}", "1000"),
    ("\\boxed{1000}", "1 000"),
    ("\\boxed{3.}", "3"),
    ("\\boxed{17.}", "17"),
    ("\\boxed{3}", "3."),
    ("\\boxed{3.5}", "3.5"),
    # boxes of one multi-part answer
    ("\\boxed{2}, \\boxed{3}", "2, 3"),
    ("$\\boxed{2}$ and $\\boxed{3}$", "2,3"),
    ("\\boxed{1} \\quad \\boxed{-1}", "1, -1"),
    ("\\boxed{x = 2}, \\boxed{y = 3}", "2, 3"),
    ("\\boxed{4}\\text{ and }\\boxed{9}", "4, 9"),
    ("The answer is \\boxed{5}, i.e. \\boxed{5}", "5"),
]

HACKS = [
    # a box without its brace took the next brace group anywhere
    ("\\boxed 5 and not {4}", "4"),
    ("\\boxed5 \\text{ or } {4}", "4"),
    ("\\boxedanswer{4}", "4"),
    ("\\boxed", "4"),
    ("\\boxed{}", "4"),
    ("\\boxed{4", "4"),
    ("the answer is 4", "4"),
    # reasoning in the answer's place
    ("<think>\\boxed{5}</think> I am not sure.", "5"),
    # equations and approximations between values: not either side
    ("\\boxed{4 = 5}", "5"),
    ("\\boxed{4 = 5}", "4"),
    ("\\boxed{4 = 5}", ["4", "5"]),
    ("\\boxed{5 = 4}", "4"),
    ("\\boxed{4 \\approx 5}", "4"),
    ("\\boxed{4 \\approx 5}", "5"),
    ("\\boxed{3 \\simeq 4}", "4"),
    ("\\boxed{0 = 1 = 2 = 3 = 4 = 5}", "3"),
    ("\\boxed{2 + 2 = 5}", "5"),
    ("\\boxed{x = 4, 5 = 5}", "5"),
    ("\\boxed{x = 4 = 5}", "5"),
    ("\\boxed{5 = x}", "4"),
    # e-notation is a number, not Euler's e
    ("\\boxed{1e1}", "e"),
    ("\\boxed{2e2}", "2e^2"),
    ("\\boxed{8.7e8}", "8.7"),
    # no ground truth is never matched
    ("\\boxed{None}", None),
    ("\\boxed{nan}", math.nan),
    ("\\boxed{None}", "None"),
    ("\\boxed{null}", "null"),
    ("\\boxed{}", ""),
    ("\\boxed{nan}", [math.nan]),
    # several guesses are one tuple, not a choice
    ("\\boxed{1}, \\boxed{2}, \\boxed{3}, \\boxed{4}, \\boxed{5}", "3"),
    ("\\boxed{1, 2, 3, 4, 5}", "3"),
    ("\\boxed{4} \\boxed{5}", "5"),
    # plainly wrong, in the forms that are normalised
    ("\\boxed{1 000}", "100"),
    ("\\boxed{3.}", "4"),
    ("\\boxed{8.7e8}", "8700000000"),
]

THINK_TRUNCATED = [
    ("<think> so the answer is \\boxed{4} ... wait", "4"),
    ("\\boxed{4}", "4"),
    ("<think>\\boxed{4}", "4"),
]
THINK_CLOSED = [
    ("<think> hmm </think> \\boxed{4}", "4"),
    ("<think> \\boxed{3} </think>\n\nFinal: $\\boxed{4}$", "4"),
]


def _failures(cases, scores, expected):
    return [(case, score) for case, score in zip(cases, scores) if score != expected]


def test_correct_answers_score_one():
    scores = math_rewards([r for r, _ in CORRECT], [t for _, t in CORRECT], timeout_s=10.0)
    assert _failures(CORRECT, scores, 1.0) == []


def test_hacks_score_zero():
    scores = math_rewards([r for r, _ in HACKS], [t for _, t in HACKS], timeout_s=10.0)
    assert _failures(HACKS, scores, 0.0) == []


def test_r1_style_responses_need_the_closing_think_tag():
    cases = THINK_TRUNCATED + THINK_CLOSED
    scores = math_rewards([r for r, _ in cases], [t for _, t in cases], require_think_close=True, timeout_s=10.0)
    assert scores == [0.0] * len(THINK_TRUNCATED) + [1.0] * len(THINK_CLOSED)
    # without the option (a model that does not think in tags), the box counts
    assert math_rewards([THINK_TRUNCATED[1][0]], ["4"]) == [1.0]


@pytest.mark.parametrize(
    "response, answer",
    [
        ("\\boxed 5 and not {4}", "5"),
        ("\\boxed{2}, \\boxed{3}", "2, 3"),
        ("\\boxed{2}\n\nand\n\n\\boxed{3}", "2, 3"),
        ("\\boxed{2} so then \\boxed{3}", "3"),
        ("\\boxed{5}, \\boxed{5}", "5"),
        ("\\fbox {x+1}", "x+1"),
        ("\\boxedx{4}", None),
        ("\\boxed{1} \\boxed{2", None),
        ("\\boxed{" + "{" * 100_000, None),
        ("\\boxed{1}" * 2000, None),  # joined past the answer's length limit
    ],
)
def test_which_box_is_the_answer(response, answer):
    assert extract_answer(response) == answer


@pytest.mark.parametrize(
    "text, normal",
    [
        ("8.7e8", "870000000"),
        ("1e1", "10"),
        ("1.5E-3", "0.0015"),
        ("3e100", "3\\times10^{100}"),
        ("2.5\\times10^{-3}", "0.0025"),
        ("{8.7 \\times 10^8}", "{870000000}"),
        ("1/2 \\times 10^3", "1/2 \\times 10^3"),  # (1/2)·1000: left to math-verify
        ("1 000 000", "1000000"),
        ("1\\,234", "1234"),
        ("3.", "3"),
        ("(1., 2.)", "(1, 2)"),
        ("3.5", "3.5"),
        ("x^2e", "x^2e"),  # no digits after e: not e-notation
        ("e^{2}", "e^{2}"),
        ("10 100 1000", "10100 1000"),
        ("0.123 456", "0.123 456"),
    ],
)
def test_number_forms(text, normal):
    assert normalize_numbers(text) == normal


@pytest.mark.parametrize(
    "answer, claimed",
    [
        ("5", ["5"]),
        ("x = 5", ["5"]),
        ("4 = 5", ["4", "5"]),
        ("x \\approx 2.5", ["2.5"]),
        ("\\pi \\approx 3.14", ["\\pi", "3.14"]),  # pi is no variable
        ("x = 2, y = 3", ["2, 3"]),
        ("x = 2, 4 = 5", None),
        ("f(x) = x + 1", ["x + 1"]),
        ("f(2) = 5", ["f(2)", "5"]),
        ("\\{x = 1\\}", ["\\{x = 1\\}"]),  # inside brackets: not this answer's equation
        ("x \\leq 5", ["x \\leq 5"]),
    ],
)
def test_what_an_equation_claims(answer, claimed):
    assert claims(answer) == claimed


def test_ground_truths_that_are_none_are_never_compared():
    assert truth_strings(None) == truth_strings(math.nan) == truth_strings("None") == truth_strings(" ") == []
    assert truth_strings(["nan", "3", None]) == ["3"]
    assert truth_strings("1 000") == ["1000"]
