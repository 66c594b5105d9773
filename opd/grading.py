"""Answer checking for judges and evaluation: a math-aware answer rule (the `math` verifier) and pass@k.

`math` reads answers the way math datasets write them (`\\boxed{\\frac{1}{2}}`, `0.5`, `1,234`, `x = 12`)
through HF's math-verify, which parses both sides to SymPy and compares them. math-verify bounds its own
time with SIGALRM, which only the main thread may use, and a student can write an answer SymPy would never
finish evaluating (`\\boxed{9^{9^{9^9}}}`). So off the main thread (the async pipeline scores on one) the
check runs in a child process, on that process's main thread, with a hard deadline on top.
Pure Python: no Ray, torch or vLLM here.
"""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

TIMEOUT_S = 5
"""math-verify's own limit (whole seconds, SIGALRM) for each parse and for the comparison."""

DEADLINE_S = 60.0
"""How long a thread waits for the child process before killing it: only for what SIGALRM cannot interrupt."""

# A response's \boxed{} wins over any number before or after it; failing that, math-verify's "answer is"
# anchors, then the last LaTeX or plain expression. first_match: the best-ranked match decides, never a later one.
_RESPONSE = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
_REFERENCE = (LatexExtractionConfig(), ExprExtractionConfig())


@lru_cache(maxsize=4096)
def _parse_reference(answer: str) -> tuple:
    """A reference answer as SymPy (empty when unreadable); cached, as every sample of a prompt shares it.

    A bare answer is read as if boxed, so LaTeX without `$` (`\\frac12`, `\\sqrt{2}`) parses; one that
    already has `$` or `\\boxed` (a full MATH-style solution) is read as written.
    """
    text = answer if ("$" in answer or "\\boxed" in answer) else f"\\boxed{{{answer}}}"
    return tuple(parse(text, _REFERENCE, parsing_timeout=TIMEOUT_S))


def _verdict_here(response: str, answer: str) -> bool | None:
    """math_verdict on this (the main) thread, where math-verify's SIGALRM limits work."""
    reference = _parse_reference(answer)
    if not reference:
        return None
    got = parse(response, _RESPONSE, extraction_mode="first_match", parsing_timeout=TIMEOUT_S)
    return bool(got) and verify(list(reference), got, timeout_seconds=TIMEOUT_S)


READY = b"ready\n"
"""The child's first line, once math-verify is imported."""


class _Child:
    """One long-lived `python -m opd.grading` process answering JSON lines; killed and restarted on a miss."""

    def __init__(self, deadline_s: float = DEADLINE_S) -> None:
        self.deadline_s = deadline_s
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None

    def verdict(self, response: str, answer: str) -> bool | None:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                root = str(Path(__file__).resolve().parents[1])
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "opd.grading"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
                )
                # Start-up (importing SymPy: seconds on a busy machine) is not the verdict's time: the deadline
                # starts once the child says it is ready.
                if self.proc.stdout.readline() != READY:
                    self.close()
                    raise RuntimeError("the math-verify child process died while starting")
            proc = self.proc
            try:
                proc.stdin.write(json.dumps([response, answer]).encode() + b"\n")
                proc.stdin.flush()
                ready, _, _ = select.select([proc.stdout], [], [], self.deadline_s)
                line = proc.stdout.readline() if ready else b""
            except OSError:  # the child died (e.g. out of memory): the broken pipe says so
                line = b""
            if not line:
                # Past the deadline or dead: scored wrong, as math-verify scores its own timeouts.
                self.close()
                return False
            return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


_CHILD = _Child()


def math_verdict(response: str, answer: str | None) -> bool | None:
    """Whether the response's answer equals `answer` mathematically; None without a readable reference.

    False when the response has no answer or checking it ran out of time.
    """
    if answer is None or not answer.strip():
        return None
    if threading.current_thread() is threading.main_thread():
        return _verdict_here(response, answer)
    return _CHILD.verdict(response, answer)


def math_correct(response: str, answer: str | None) -> bool:
    """The `math` answer rule: math_verdict, with an unreadable or missing reference counting as wrong."""
    return math_verdict(response, answer) is True


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021).

    The chance that k of the n samples drawn without replacement include a correct one. Computed as a
    product of ratios rather than binomials, which overflow floats for n in the hundreds.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _serve() -> None:
    """The child's loop: one `[response, answer]` JSON line in, one verdict line out, on its main thread."""
    sys.stdout.write(READY.decode())
    sys.stdout.flush()
    for line in sys.stdin.buffer:
        response, answer = json.loads(line)
        sys.stdout.write(json.dumps(_verdict_here(response, answer)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
