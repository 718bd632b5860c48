"""What the math verifier compares: the final boxed answer cut out of a response, and both sides put
in one form before math-verify sees them. Pure string functions (no math-verify, no processes).

Each rule closes a way to score without the answer (docs/rollouts.md, "The math verifier"):
- The box: `\\boxed{...}` / `\\fbox{...}` with the brace right after the command (spaces allowed),
  braces matched; `\\boxed 4` is the token after it. `\\boxed 5 and not {4}` is 5, not 4.
- The last box counts; boxes of one multi-part answer separated only by commas, "and" or spacing
  are joined: `\\boxed{2}, \\boxed{3}` is "2, 3".
- Reasoning: the answer is read after the last `</think>`; with require_think_close a response
  without it (reasoning cut off by the token limit) has no answer.
- Relations: `x = 5` and `x \\approx 5` are 5 when the left side is a variable; otherwise every side
  of an equation must equal the ground truth (`4 = 5` is neither 4 nor 5; `2 + 2 = 4` is 4), unless
  the ground truth is itself an equation (then math-verify compares the equations).
- Numbers: e-notation and `a \\times 10^{n}` become exact decimals (8.7e8 is 870000000; 1e1 is 10,
  not e), digit groups split by spaces or thin spaces are joined (1 000 is 1000), and a trailing
  point goes (3. is 3); on both sides.
- Ground truths None, NaN, empty, "None", "nan" or "null" are no ground truth: never compared.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from ..data.dataset import usable_truth

THINK_CLOSE = "</think>"
MAX_ANSWER_CHARS = 1000  # a longer "answer" is not a final answer; math-verify need not see it

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# what may stand between two boxes of one answer: spacing, commas, "and", inline-math delimiters
_JOIN = re.compile(r"(?:\s|\$|\\[,;:! ]|\\q?quad\b|~|,|;|\band\b|\\(?:text|mbox|textrm|mathrm)\{\s*(?:and|,)?\s*\})*")


def _read_box(text: str, i: int) -> tuple[str | None, int]:
    """The argument of a box command whose name ends at i, and where it ends; (None, _) if malformed."""
    n = len(text)
    j = i
    while j < n and text[j].isspace():
        j += 1
    if j < n and text[j] == "{":
        depth = 0
        for k in range(j, n):
            if text[k] == "{":
                depth += 1
            elif text[k] == "}":
                depth -= 1
                if depth == 0:
                    return text[j + 1 : k], k + 1
        return None, n  # unbalanced
    # `\boxed 4`: one token, up to spacing, `$` or a closing brace of the surrounding group
    depth, k = 0, j
    while k < n and not text[k].isspace() and text[k] != "$":
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            if depth == 0:
                break
            depth -= 1
        k += 1
    return (text[j:k] if k > j and depth == 0 else None), k


def boxed_answer(text: str) -> str | None:
    """The last box's contents, joined with the boxes before it that belong to the same answer."""
    parts: list[str] = []
    next_start = None
    for match in reversed(list(_BOX.finditer(text))):
        content, end = _read_box(text, match.end())
        if content is None or not content.strip():
            if parts:
                break
            return None  # the last box is malformed or empty: no answer
        if next_start is not None and (end > next_start or not _JOIN.fullmatch(text[end:next_start])):
            break  # nested in the next box, or text in between: an earlier result, not this answer
        parts.append(content.strip())
        next_start = match.start()
        if sum(map(len, parts)) > MAX_ANSWER_CHARS:
            return None
    if not parts:
        return None
    parts.reverse()
    return parts[0] if len(set(parts)) == 1 else ", ".join(parts)


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}) in text, braces matched; None if absent."""
    for match in reversed(list(_BOX.finditer(text))):
        return _read_box(text, match.end())[0]
    return None


def extract_answer(response: str, require_think_close: bool = False) -> str | None:
    """The final answer of a response (after `</think>`), or None (no box, no closed reasoning)."""
    if THINK_CLOSE in response:
        response = response.rsplit(THINK_CLOSE, 1)[1]
    elif require_think_close:
        return None
    answer = boxed_answer(response)
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return None
    return answer


# ----- number forms ---------------------------------------------------------------------------

_E_NOTATION = re.compile(r"(?<![\w.\\])(\d+\.?\d*|\.\d+)[eE]([+-]?\d{1,4})(?![\w.])")
_SCIENTIFIC = re.compile(
    r"(?<![\w.^}\\])(\d+(?:\.\d+)?)\s*(?:\\times|\\cdot|×)\s*10\s*\^\s*(?:\{\s*([+-]?\d{1,4})\s*\}|(\d))(?![\d.])"
)
_DIGIT_GROUPS = re.compile(r"(?<![\d.])\d{1,3}(?:(?:\s|\\[,; !]|~|\{\\,\})\d{3})+(?![\d])")
_TRAILING_POINT = re.compile(r"(?<=\d)\.(?=\s*(?:$|[,;)\]]|\\\}|\\right))")
_MAX_PLAIN_EXPONENT = 30  # beyond, a decimal with that many zeros is no clearer than its power


def _exact(mantissa: str, exponent: str) -> str:
    try:
        value = Decimal(mantissa).scaleb(int(exponent))
    except (InvalidOperation, ValueError):
        return f"{mantissa}\\times10^{{{exponent}}}"
    if abs(int(exponent)) > _MAX_PLAIN_EXPONENT:
        return f"{mantissa}\\times10^{{{int(exponent)}}}"
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _scientific(m: re.Match) -> str:
    before = m.string[: m.start()].rstrip()
    if before.endswith(("/", "\\div", "^", "_")):  # 1/2 \times 10^3 is (1/2)·1000, not 1/2000
        return m.group(0)
    return _exact(m.group(1), m.group(2) or m.group(3))


def normalize_numbers(text: str) -> str:
    """Number forms math-verify misreads, rewritten: 8.7e8 -> 870000000, 2.5\\times10^{-3} -> 0.0025,
    1 000 -> 1000, 3. -> 3."""
    text = _E_NOTATION.sub(lambda m: _exact(m.group(1), m.group(2)), text)
    text = _SCIENTIFIC.sub(_scientific, text)
    text = _DIGIT_GROUPS.sub(lambda m: re.sub(r"\D", "", m.group(0)), text)
    return _TRAILING_POINT.sub("", text)


# ----- relations ------------------------------------------------------------------------------

_RELATION = re.compile(r"\\approxeq|\\approx|\\thickapprox|\\simeq|\\doteq|\\coloneqq|:=|(?<![<>!=:\\])=(?![=<>])")
_GREEK = (
    "alpha|beta|gamma|delta|epsilon|varepsilon|zeta|eta|theta|vartheta|iota|kappa|lambda|mu|nu|xi|rho|"
    "sigma|tau|upsilon|phi|varphi|chi|psi|omega|Gamma|Delta|Theta|Lambda|Xi|Sigma|Phi|Psi|Omega"
)  # not pi: a constant
_VARIABLE = re.compile(
    r"\s*(?:[A-Za-z]{1,3}|\\(?:" + _GREEK + r")(?![A-Za-z])"
    r"|\\(?:text|mathrm|mathit|operatorname)\{[A-Za-z ]+\}"
    r"|\\(?:overline|angle|vec|hat|bar|widehat)\s*\{?\s*[A-Za-z]{1,3}\s*\}?)"
    r"(?:\s*_\s*(?:\{[A-Za-z0-9, ]+\}|[A-Za-z0-9])|')*(?:\^\s*\{?\*\}?)?"
    r"(?:\s*(?:\(|\\left\()[A-Za-z, ]*(?:\)|\\right\)))?\s*"
)
_OPEN, _CLOSE = "{([", "})]"


def _top_level_split(text: str, pattern: re.Pattern) -> list[str]:
    """text split at the matches of pattern that lie outside every bracket pair."""
    depth, pieces, start, i = 0, [], 0, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and text.startswith(("\\{", "\\}"), i):
            depth += 1 if text[i + 1] == "{" else -1
            i += 2
            continue
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif depth == 0 and (m := pattern.match(text, i)) and m.end() > i:
            pieces.append(text[start:i])
            start = i = m.end()
            continue
        i += 1
    pieces.append(text[start:])
    return pieces


_COMMA = re.compile(",")


def has_relation(text: str) -> bool:
    return len(_top_level_split(text, _RELATION)) > 1


def claims(answer: str) -> list[str] | None:
    """What an answer claims equals the ground truth: [answer] as it is, the right side of
    `variable = value` (per part of a multi-part answer), or every side of an equation between
    values (each must match). None when a multi-part answer holds an equation between values."""
    sides = _top_level_split(answer, _RELATION)
    if len(sides) == 1:
        return [answer]
    if _VARIABLE.fullmatch(sides[0]):
        if len(sides) == 2 or len(_top_level_split(answer, _COMMA)) == 1:
            return [s.strip() for s in sides[1:]]  # x = 10/2 = 5: each value must match
    parts = _top_level_split(answer, _COMMA)
    if len(parts) > 1:  # x = 2, y = 3 -> "2, 3"
        values = []
        for part in parts:
            part_sides = _top_level_split(part, _RELATION)
            if len(part_sides) == 1:
                values.append(part.strip())
            elif len(part_sides) == 2 and _VARIABLE.fullmatch(part_sides[0]):
                values.append(part_sides[1].strip())
            else:
                return None
        return [", ".join(values)]
    return [s.strip() for s in sides]


# ----- ground truths --------------------------------------------------------------------------


def truth_strings(ground_truth) -> list[str]:
    """The acceptable answers of a ground truth, normalised; [] when it is no ground truth."""
    if hasattr(ground_truth, "tolist"):  # numpy arrays and scalars
        ground_truth = ground_truth.tolist()
    items = ground_truth if isinstance(ground_truth, (list, tuple)) else [ground_truth]
    return [normalize_numbers(str(t).strip()) for t in items if usable_truth(t)]


def verifier_job(answer: str | None, ground_truth) -> tuple[list[str], list[str]] | None:
    """(claims, truths) for math-verify: every claim must equal one of the truths; None: scores 0."""
    truths = truth_strings(ground_truth)
    if answer is None or not truths:
        return None
    answer = normalize_numbers(answer)
    if any(has_relation(t) for t in truths):
        return [answer], truths  # the ground truth is an equation: math-verify compares equations
    answer_claims = claims(answer)
    return None if not answer_claims or not all(answer_claims) else (answer_claims, truths)
