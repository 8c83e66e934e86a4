"""The builtin arithmetic task: multi-step word problems with exact integer answers, as preference pairs.

This is the DPOP paper's MetaMath setting in miniature. Each problem comes from one of a few templates
(shopping, apples, a trip, ...) and is solved in 2-3 steps; the correct worked solution is `chosen`:

    Lena saves $7 every week for 4 weeks and gets a $5 gift. Then she spends $12 on a game. How many
    dollars does she have left?

    Lena saves 7 × 4 = 28 dollars.
    With the gift, that is 28 + 5 = 33 dollars.
    After the game, 33 - 12 = 21 dollars are left.
    The answer is 21.

Every solution ends with the fixed line `The answer is N.` (ANSWER_LINE); `extract_answer` reads it back.

`rejected`, by `edit`:
- "low": the paper's construction. The result of ONE intermediate step (any step but the last) has one digit
  replaced, and everything else is left exactly as it is: later steps still use the true value and the
  answer line still states the correct answer (the paper "leaves the answer untouched"). So exactly one
  number differs, the normalised character edit distance is a few percent, and the flaw is a wrong
  calculation, not a wrong final answer. The last step is never corrupted: its result is the answer.
- "high": a different, wrong solution in bare equations (add up every number in the question; or redo the
  steps with the wrong operations; or stop after the first step), always ending in a wrong answer. It
  shares little text with the chosen solution (normalised edit distance around 0.5).

Splits: a problem's split ("train", "sft" or "eval") is a function of its canonical key (template + numbers,
not the name in it) through sha256, so two splits can never hold the same problem, whatever the seeds.
Everything is deterministic by seed across processes (string-seeded `random.Random`, no `hash()`). Each
split is a finite pool (about 4,000 train, 1,300 sft and 1,300 eval problems); asking for more is an error.

Difficulty (numbers are small: factors 2-9, results under ~400): the builtin SmolLM2-135M-Instruct, greedy,
96 new tokens, on 100 eval problems gets 3% zero-shot, about 11% with two worked examples in context, and
20-38% after a brief SFT (200 sft problems, 25 steps of 8, lr 1e-4; two runs). After SFT the format is
always right and the mistakes are wrong results of single steps (subtraction worst): exactly what the
low-edit pairs single out.

    rows = make_pairs(200, edit="low", seed=1)            # JSONL-ready rows (DESIGN.md §5 conversational)
    write_jsonl(rows, "pairs.jsonl")
    problems = make_problems(100, seed=0, split="eval")   # questions + answers for task accuracy
    is_correct(generated_text, problems[0].answer)
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dpop.errors import ConfigError

SPLITS = ("train", "sft", "eval")
EDITS = ("low", "high")
ANSWER_LINE = "The answer is {answer}."
# sha256(key) % 10 picks the split: 6 buckets train, 2 sft, 2 eval.
_SPLIT_OF_BUCKET = ("train",) * 6 + ("sft",) * 2 + ("eval",) * 2
_OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "×": lambda a, b: a * b,
    "÷": lambda a, b: a // b,  # templates only divide exactly
}
_PEOPLE = (("Sam", "he"), ("Mia", "she"), ("Leo", "he"), ("Ava", "she"),
           ("Noah", "he"), ("Zoe", "she"), ("Omar", "he"), ("Lena", "she"))


@dataclass(frozen=True)
class Step:
    """One line of a worked solution: `{lead}{left} {op} {right} = {result}{tail}`."""

    lead: str
    left: int
    op: str
    right: int
    tail: str

    @property
    def result(self) -> int:
        return _OPERATIONS[self.op](self.left, self.right)

    def text(self, result: int | None = None) -> str:
        """The line as written; `result` overrides the (correct) result, which is how corruption works."""
        shown = self.result if result is None else result
        return f"{self.lead}{self.left} {self.op} {self.right} = {shown}{self.tail}"


@dataclass(frozen=True)
class Problem:
    """One word problem: its template, the numbers in it, the question, the solution steps and the answer."""

    template: str
    numbers: tuple[int, ...]  # the numbers of the question, in the order it states them
    question: str
    steps: tuple[Step, ...]

    @property
    def answer(self) -> int:
        return self.steps[-1].result

    @property
    def key(self) -> str:
        """Canonical identity: template and numbers (names and wording do not make a new problem)."""
        return f"{self.template}:{','.join(map(str, self.numbers))}"

    @property
    def split(self) -> str:
        return split_of(self.key)

    @property
    def id(self) -> str:
        return f"arithmetic-{self.split}-{_digest(self.key)[:12]}"

    @property
    def solution(self) -> str:
        """The correct worked solution (the `chosen` response)."""
        return _solution_text([step.text() for step in self.steps], self.answer)

    def messages(self) -> list[dict[str, str]]:
        """The prompt as a conversation: one user turn holding the question."""
        return [{"role": "user", "content": self.question}]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_of(key: str) -> str:
    """The split a problem key belongs to; fixed forever by the key alone."""
    return _SPLIT_OF_BUCKET[int(_digest(key)[:16], 16) % len(_SPLIT_OF_BUCKET)]


def _solution_text(lines: list[str], answer: int) -> str:
    return "\n".join([*lines, ANSWER_LINE.format(answer=answer)])


# --- templates: each draws its numbers from rng and returns (numbers, question, steps) -----------------

def _shopping(rng: random.Random, name: str, he: str):
    count, price, bag = rng.randint(2, 5), rng.randint(2, 9), rng.randint(2, 9)
    question = (f"{name} buys {count} pens that cost ${price} each and a bag that costs ${bag}. "
                f"How many dollars does {he} spend?")
    steps = (Step("The pens cost ", count, "×", price, " dollars."),
             Step(f"With the bag, {name} spends ", count * price, "+", bag, " dollars."))
    return (count, price, bag), question, steps


def _apples(rng: random.Random, name: str, he: str):
    bags, per_bag = rng.randint(2, 5), rng.randint(2, 9)
    eaten = rng.randint(2, min(9, bags * per_bag - 2))
    question = (f"{name} has {bags} bags with {per_bag} apples in each bag. {he.capitalize()} eats "
                f"{eaten} apples. How many apples are left?")
    steps = (Step(f"{name} has ", bags, "×", per_bag, " apples."),
             Step("After eating some, there are ", bags * per_bag, "-", eaten, " apples left."))
    return (bags, per_bag, eaten), question, steps


def _trip(rng: random.Random, name: str, he: str):
    speed, hours, extra = 10 * rng.randint(2, 9), rng.randint(2, 4), rng.randint(2, 9)
    question = (f"{name} rides a bus that travels {speed} km each hour for {hours} hours, then walks "
                f"{extra} km. How many km does {he} travel in total?")
    steps = (Step("The bus covers ", speed, "×", hours, " km."),
             Step("In total, that is ", speed * hours, "+", extra, " km."))
    return (speed, hours, extra), question, steps


def _cookies(rng: random.Random, name: str, he: str):
    friends, each = rng.randint(2, 5), rng.randint(2, 9)
    baked = rng.randint(1, friends * each - 2)  # at least 2 cookies to start with
    question = (f"{name} has {friends * each - baked} cookies and bakes {baked} more. {he.capitalize()} "
                f"shares them equally among {friends} friends. How many cookies does each friend get?")
    steps = (Step(f"{name} has ", friends * each - baked, "+", baked, " cookies."),
             Step("Each friend gets ", friends * each, "÷", friends, " cookies."))
    return (friends * each - baked, baked, friends), question, steps


def _pages(rng: random.Random, name: str, he: str):
    per_day, days = rng.randint(2, 9), rng.randint(2, 5)
    book = per_day * days + rng.randint(2, 20)
    question = (f"A book has {book} pages. {name} reads {per_day} pages a day for {days} days. "
                f"How many pages are left to read?")
    steps = (Step(f"{name} reads ", per_day, "×", days, " pages."),
             Step("There are ", book, "-", per_day * days, " pages left."))
    return (book, per_day, days), question, steps


def _savings(rng: random.Random, name: str, he: str):
    weekly, weeks, gift = rng.randint(2, 9), rng.randint(2, 5), rng.randint(2, 9)
    saved = weekly * weeks + gift
    spent = rng.randint(1, min(20, saved - 2))  # at least $2 left
    question = (f"{name} saves ${weekly} every week for {weeks} weeks and gets a ${gift} gift. "
                f"Then {he} spends ${spent} on a game. How many dollars does {he} have left?")
    steps = (Step(f"{name} saves ", weekly, "×", weeks, " dollars."),
             Step("With the gift, that is ", weekly * weeks, "+", gift, " dollars."),
             Step("After the game, ", saved, "-", spent, " dollars are left."))
    return (weekly, weeks, gift, spent), question, steps


def _teams(rng: random.Random, name: str, he: str):
    size, teams, balls = rng.randint(2, 5), rng.randint(2, 5), rng.randint(2, 4)
    girls = rng.randint(2, size * teams - 2)
    boys = size * teams - girls
    question = (f"{name}'s class has {girls} girls and {boys} boys. They make teams of {size}, and each "
                f"team gets {balls} balls. How many balls are needed?")
    steps = (Step("The class has ", girls, "+", boys, " children."),
             Step("There are ", size * teams, "÷", size, " teams."),
             Step("They need ", teams, "×", balls, " balls."))
    return (girls, boys, size, balls), question, steps


_TEMPLATES = {"shopping": _shopping, "apples": _apples, "trip": _trip, "cookies": _cookies,
              "pages": _pages, "savings": _savings, "teams": _teams}


def make_problems(n: int, seed: int, *, split: str = "train") -> list[Problem]:
    """`n` distinct problems of one split, the same for the same (n, seed, split) in any process.

    Problems are drawn from all templates and kept if their key falls in `split`; a longer list with the
    same seed and split starts with the shorter one.
    """
    _check_choice("split", split, SPLITS)
    if n < 0:
        raise ConfigError(f"--n must be >= 0, got {n}")
    rng = random.Random(f"dpop-arithmetic:{split}:{seed}")
    names = sorted(_TEMPLATES)
    problems: dict[str, Problem] = {}
    draws_without_new = 0
    while len(problems) < n:
        draws_without_new += 1
        if draws_without_new > 2_000:  # the split's pool of distinct problems is (nearly) exhausted
            raise ConfigError(f"could only make {len(problems)} distinct {split} problems, not --n {n}; "
                              "ask for fewer")
        template = rng.choice(names)
        name, he = rng.choice(_PEOPLE)
        numbers, question, steps = _TEMPLATES[template](rng, name, he)
        problem = Problem(template, numbers, question, steps)
        if problem.split == split and problem.key not in problems:
            problems[problem.key] = problem
            draws_without_new = 0
    return list(problems.values())


# --- rejected responses ------------------------------------------------------------------------------

def low_edit_rejected(problem: Problem, rng: random.Random) -> str:
    """The solution with one digit of one intermediate result replaced; all else exactly as it was."""
    index = rng.randrange(len(problem.steps) - 1)  # never the last step: its result is the answer
    digits = str(problem.steps[index].result)
    position = rng.randrange(len(digits))
    leading_zero = position == 0 and len(digits) > 1  # "28" may become "38" or "24", never "08"
    replacements = [d for d in "0123456789" if d != digits[position] and not (leading_zero and d == "0")]
    wrong = int(digits[:position] + rng.choice(replacements) + digits[position + 1:])
    lines = [step.text(wrong if i == index else None) for i, step in enumerate(problem.steps)]
    return _solution_text(lines, problem.answer)


def _wrong_sum(problem: Problem) -> tuple[list[str], int]:
    total = sum(problem.numbers)
    return [f"{' + '.join(map(str, problem.numbers))} = {total}."], total


def _wrong_operations(problem: Problem) -> tuple[list[str], int]:
    swap = {"+": "-", "-": "+", "×": "+", "÷": "×"}
    lines, previous_true, previous_wrong = [], None, None
    for step in problem.steps:  # redo the steps with swapped operations, carrying the wrong results on
        left = previous_wrong if step.left == previous_true else step.left
        right = previous_wrong if step.right == previous_true else step.right
        op = swap[step.op]
        result = _OPERATIONS[op](left, right)
        lines.append(f"{left} {op} {right} = {result}.")
        previous_true, previous_wrong = step.result, result
    return lines, previous_wrong


def _wrong_first_step_only(problem: Problem) -> tuple[list[str], int]:
    first = problem.steps[0]
    return [f"{first.left} {first.op} {first.right} = {first.result}."], first.result


def high_edit_rejected(problem: Problem, rng: random.Random) -> str:
    """A different solution in bare equations whose final answer is wrong."""
    strategies = [_wrong_sum, _wrong_operations, _wrong_first_step_only]
    rng.shuffle(strategies)
    for strategy in strategies:
        lines, stated = strategy(problem)
        if stated != problem.answer:
            return _solution_text(lines, stated)
    # every plan happened to land on the right answer: keep the sum but slip on its result
    lines, stated = _wrong_sum(problem)
    lines[-1] = lines[-1].replace(f"= {stated}.", f"= {stated + 1}.")
    return _solution_text(lines, stated + 1)


_REJECTERS = {"low": low_edit_rejected, "high": high_edit_rejected}


def make_pairs(n: int, *, edit: str = "low", seed: int = 0, split: str = "train") -> list[dict]:
    """`n` preference rows in DESIGN.md §5's conversational shape, plus `answer` and `id` metadata.

    The problems are `make_problems(n, seed, split=split)`; each pair's corruption is seeded by the problem
    key, `edit` and `seed`, so a row does not depend on its position in the list.
    """
    _check_choice("edit", edit, EDITS)
    rows = []
    for problem in make_problems(n, seed, split=split):
        rng = random.Random(f"dpop-arithmetic-rejected:{problem.key}:{edit}:{seed}")
        rows.append({
            "prompt": problem.messages(),
            "chosen": [{"role": "assistant", "content": problem.solution}],
            "rejected": [{"role": "assistant", "content": _REJECTERS[edit](problem, rng)}],
            "answer": problem.answer,
            "id": problem.id,
        })
    return rows


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{option} must be one of {', '.join(choices)}; got {value!r}")


# --- answer checking ---------------------------------------------------------------------------------

# An integer or decimal, optionally negative (a sign glued to the digits and not following a word or
# digit, so the "-" of "10-5" is an operator) and optionally with thousands commas ("1,234").
_NUMBER = re.compile(r"(?<![\w.,])([-−]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\d)")
# Phrases that state an answer: "answer is", "answer:", "answer =", GSM8K's "####", LaTeX's "\boxed{".
_ANSWER_MARKER = re.compile(r"\banswer\s*(?:is|:|=)|####|\\boxed\{", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\n|\.(?:\s|$)")


def _number_value(match: re.Match) -> int | None:
    """The integer a number match states, or None when it has a non-zero fractional part (2.5)."""
    sign, digits, fraction = match.groups()
    if fraction and fraction.strip(".0"):
        return None
    value = int(digits.replace(",", ""))
    return -value if sign else value


def extract_answer(text: str) -> int | None:
    """The final integer answer a generation states, or None if it states none.

    Rule: find the last answer statement ("The answer is", "answer:", "answer =", "####", "\\boxed{")
    that has a number in the rest of its sentence (up to a newline or a sentence-ending "."). In that
    sentence take the first number, or, if it holds an equation ("The answer is 3 × 7 = 21."), the first
    number after its last "=". With no such statement, take the last number in the whole text ("... so 24").
    Numbers may carry a sign ("-5", "−5"), a currency sign ("$24") and thousands commas ("1,234");
    a non-integer ("2.5") gives None, since it cannot equal an integer answer.
    """
    for marker in reversed(list(_ANSWER_MARKER.finditer(text))):
        rest = text[marker.end():]
        sentence = rest[: end.start()] if (end := _SENTENCE_END.search(rest)) else rest
        if "=" in sentence:
            sentence = sentence[sentence.rindex("=") + 1:]
        if match := _NUMBER.search(sentence):
            return _number_value(match)
    numbers = list(_NUMBER.finditer(text))
    return _number_value(numbers[-1]) if numbers else None


# A sentence that has certainly ended while text is still being generated: "2." may yet become "2.5".
_SENTENCE_CLOSED = re.compile(r"\n|\.\s")


def states_answer(text: str) -> bool:
    """Whether a generation in progress has finished an answer statement ("The answer is 13.\n"): the place
    to stop generating. A statement counts once its sentence is closed by a newline or by "." and a space,
    so a number still being written ("2." of "2.5") never stops it."""
    for marker in _ANSWER_MARKER.finditer(text):
        rest = text[marker.end():]
        if (end := _SENTENCE_CLOSED.search(rest)) and _NUMBER.search(rest[: end.start()]):
            return True
    return False


def is_correct(text: str, answer: int) -> bool:
    """Whether the answer `text` states (see `extract_answer`) is `answer`."""
    return extract_answer(text) == answer


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write one JSON object per line (UTF-8, "×" kept as is), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
