import itertools
import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from opd import grading
from opd.grading import math_correct, math_verdict, pass_at_k
from opd.teachers.judge import get_verifier, run_verifier

CASES = [
    # (response, reference, correct)
    (r"so the answer is \boxed{\frac{1}{2}}", "1/2", True),
    (r"so the answer is \boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{\frac{1}{2}}", r"\frac12", True),
    (r"First 3, then 4, so \boxed{7} (not 9)", "7", True),  # \boxed{} beats numbers before and after it
    (r"First 3, then 4, so \boxed{7} (not 9)", "9", False),
    ("The total is 1,234 dollars.", "1234", True),
    ("The total is 1234.", "1,234", True),
    (r"\boxed{1,234}", "1234", True),
    ("x = 12", "12", True),
    ("Solving gives $x = 12$.", "12", True),
    (r"The answer is $\sqrt{2}$.", r"\sqrt{2}", True),
    (r"The answer is $\frac{3}{4}$.", "0.75", True),
    ("It is 5.", "6", False),
    ("It is $-5$.", "5", False),
    (r"\boxed{\frac{1}{3}}", "0.5", False),
    ("I do not know.", "3", False),  # no answer at all
    ("", "3", False),
]


@pytest.mark.parametrize(("response", "answer", "correct"), CASES)
def test_math_correct(response, answer, correct):
    assert math_correct(response, answer) is correct


def test_no_reference_is_no_verdict():
    assert math_verdict(r"\boxed{3}", None) is None
    assert math_verdict(r"\boxed{3}", "  ") is None
    assert not math_correct(r"\boxed{3}", None)


def test_off_the_main_thread():
    """The async pipeline scores on a thread, where math-verify's SIGALRM limits raise: the same verdicts there."""
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda case: math_correct(case[0], case[1]), CASES))
        assert pool.submit(math_verdict, r"\boxed{3}", None).result() is None
    assert got == [correct for _, _, correct in CASES]


def test_answer_sympy_cannot_finish_is_wrong_in_bounded_time():
    """A power tower SymPy would evaluate for ever: math-verify's own limit on the main thread, the child
    process's deadline (killed, then restarted for the next call) off it."""
    tower = r"\boxed{9^{9^{9^{9}}}}"
    start = time.monotonic()
    assert not math_correct(tower, "3")
    assert time.monotonic() - start < 4 * grading.TIMEOUT_S
    child = grading._Child(deadline_s=1.0)
    try:
        with ThreadPoolExecutor(1) as pool:
            start = time.monotonic()
            assert pool.submit(child.verdict, tower, "3").result() is False
            assert time.monotonic() - start < grading.TIMEOUT_S  # the deadline fired, not math-verify's limit
            assert child.proc is None
            assert pool.submit(child.verdict, r"\boxed{3}", "3").result() is True  # a fresh child
    finally:
        child.close()


def test_math_judge_verifier():
    math_judge = get_verifier("math")
    assert math_judge(r"so \boxed{\frac{1}{2}}", "0.5", {}) == 1.0
    assert math_judge("so 3", "0.5", {}) == 0.0
    assert math_judge("no answer", "0.5", {}) == 0.0
    assert math_judge(r"\boxed{3}", None, {}) is None
    assert run_verifier(math_judge, r"\boxed{1,234}", "1234", {}).score == 1.0


def _pass_at_k_by_subsets(n: int, c: int, k: int) -> float:
    """The definition: the fraction of k-subsets of the n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_the_definition():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_subsets(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 7, 4) == 1.0  # n - c < k: every 4 samples include a correct one
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the plain accuracy
    # Large n, where C(n, k) as a float overflows: still finite and equal to the exact ratio of integers.
    exact = 1 - math.comb(1000 - 3, 200) / math.comb(1000, 200)
    assert pass_at_k(1000, 3, 200) == pytest.approx(exact, rel=1e-12)
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(*bad)
