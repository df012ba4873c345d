"""HumanEval pass@k and HumanEval infilling for every checkpoint of runs / releases, or a Hugging Face export.

    python -m crystal.analysis code-eval release/                         every release checkpoint, results into it
    python -m crystal.analysis code-eval outputs/s1 outputs/s2 code.samples=20
    python -m crystal.analysis code-eval --reference                      canonical solutions: `passed 164/164`
    python -m crystal.analysis code-eval --hf hf/tiny                     the same evaluation through transformers

Writes into DIR (a release: <release>/evals/, recorded in its manifest; a run: <run>/analysis/; --hf:
<export>/evals/; --out overrides, and then nothing is added to a release):
    code_eval.csv               one row per (checkpoint, benchmark, mode, k): pass@k, exact match, counts
    code_eval.png               greedy pass@1, sampled pass@k and infilling pass rates over training tokens,
                                stage boundaries marked
    code_eval_samples.jsonl.gz  every completion with its prompt size, verdict and reason
    code_eval.json              settings, the dataset's sha256, sandbox limits and the layers in force

The tasks, prompts and programs are crystal.analysis.humaneval's; generation is batched with a KV cache
(crystal.analysis.decode.generate, or transformers' generate for --hf); every program runs in
crystal.analysis.sandbox, in parallel across cores.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from crystal.analysis import humaneval as he
from crystal.analysis import plots
from crystal.analysis.decode import generate
from crystal.analysis.memorization import write_csv
from crystal.analysis.sandbox import Limits, default_workers, run_many
from crystal.analysis.timeline import AnalysisError, CheckpointRef, Timeline, build_timeline, load_model
from crystal.config import AnalysisConfig, CodeEvalConfig
from crystal.data.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from crystal.tokenizer import ADDED_TOKENS, Tokenizer
from crystal.utils import autocast_dtype, git_commit, resolve_device

STOP_WINDOW = 32  # tokens decoded to look for a stop sequence; stop sequences are at most 6 characters


# ----------------------------------------------------------------------------------------------
# Tokenizers: crystal's own or a transformers one, seen the same way


@dataclass
class Codec:
    encode: Callable[[str], list[int]]  # plain text, no special tokens added
    decode: Callable[[list[int]], str]
    fim_ids: dict[str, int]
    stop_ids: frozenset[int]  # EOS and the added tokens: none of them belongs in a completion
    vocab_limit: int  # ids from here up are embedding padding rows, never sampled
    bos: list[int]  # put before every prompt (crystal: none, training documents carry no BOS)

    def token_id(self, token: str) -> int:  # what crystal.data.fim.fim_layout asks of a tokenizer
        return self.fim_ids[token]

    def completion(self, prompt: list[int], new: list[int]) -> str:
        """The text the new ids add to the prompt (a tokenizer that adds a space before a piece's first word,
        as LLaMA's does, decodes a completion differently alone than after its prompt)."""
        head, full = self.decode(prompt), self.decode(prompt + new)
        return full[len(head) :] if full.startswith(head) else self.decode(new)

    @classmethod
    def from_crystal(cls, tok: Tokenizer) -> Codec:
        fim = {t: tok.token_id(t) for t in (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)}
        stops = frozenset({tok.eos_id, *tok.added.values()})
        return cls(tok.encode, tok.decode, fim, stops, tok.base_vocab + len(ADDED_TOKENS), [])

    @classmethod
    def from_hf(cls, tok) -> Codec:
        ids = {t: tok.convert_tokens_to_ids(t) for t in ADDED_TOKENS}
        ids = {t: i for t, i in ids.items() if i is not None and i != tok.unk_token_id}
        fim = {t: ids[t] for t in (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX) if t in ids}
        bos = [tok.bos_token_id] if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None else []
        return cls(lambda s: tok.encode(s, add_special_tokens=False), lambda i: tok.decode(i), fim,
                   frozenset({tok.eos_token_id, *ids.values()}), len(tok), bos)  # fmt: skip


def checkpoint_tokenizer(ref: CheckpointRef) -> Tokenizer:
    """The sentencepiece model a checkpoint was trained with (next to a release, in the run's config or the
    data cache, matched by sha256)."""
    from crystal.hf import find_tokenizer

    meta = json.loads((ref.path / "trainer.json").read_text())
    config = ref.path / "config.yaml"
    path = find_tokenizer(ref.path, meta, config.read_text() if config.is_file() else "")
    if path is None:
        raise AnalysisError(f"tokenizer of {ref.path} (sha256 {str(meta.get('tokenizer_sha256'))[:12]}) not found next "
                            "to it, in data.tokenizer.path or in the data cache (CRYSTAL_CACHE)")  # fmt: skip
    return Tokenizer(path, meta["model_config"]["vocab_size"])


# ----------------------------------------------------------------------------------------------
# Generators: prompts -> new ids, greedy or sampled, stopping at the task's stop sequences


def _stop_fn(codec: Codec, stops: list[tuple[str, ...]]):
    def stop(i: int, ids: list[int]) -> bool:
        return bool(stops[i]) and any(s in codec.decode(ids[-STOP_WINDOW:]) for s in stops[i])

    return stop


def _batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


class CrystalGenerator:
    """crystal's own model, KV-cached ragged batches (crystal.analysis.decode.generate)."""

    def __init__(self, model, codec: Codec, batch_size: int) -> None:
        self.model, self.codec, self.batch_size = model, codec, batch_size
        self.device = next(model.parameters()).device
        self.max_len = model.cfg.max_seq_len
        self.amp = autocast_dtype("auto", self.device)

    def __call__(self, prompts: list[list[int]], stops: list[tuple[str, ...]], max_new: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[list[int]]:  # fmt: skip
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
        out: list[list[int]] = [[] for _ in prompts]
        b = 0
        while order:
            # copies of one prompt (the samples of a problem) share one prompt pass; otherwise a batch of prompts
            same = next((n for n, i in enumerate(order) if prompts[i] != prompts[order[0]]), len(order))
            copies = min(same, self.batch_size) if same > 1 else 1
            idx = order[:copies] if copies > 1 else order[: self.batch_size]
            order = order[len(idx) :]
            unique = [prompts[idx[0]]] if copies > 1 else [prompts[i] for i in idx]
            gen = torch.Generator(self.device).manual_seed(_batch_seed(seed, b)) if temperature > 0 else None
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                new = generate(self.model, unique, max_new, samples=copies, temperature=temperature, top_p=top_p,
                               generator=gen, stop_ids=self.codec.stop_ids, vocab_limit=self.codec.vocab_limit,
                               stop=_stop_fn(self.codec, [stops[i] for i in idx]))  # fmt: skip
            for i, ids in zip(idx, new):
                out[i] = ids
            b += 1
        return out


class HFGenerator:
    """A transformers causal LM (an export of crystal, or LLM360's CrystalCoder): its own generate, left-padded
    batches, the same stop rules, prompts and sampling settings."""

    def __init__(self, model, codec: Codec, batch_size: int) -> None:
        from crystal.hf import import_transformers

        self.transformers = import_transformers()
        self.model, self.codec, self.batch_size = model, codec, batch_size
        self.device = next(model.parameters()).device
        cfg = model.config
        self.max_len = int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 2048))
        self.pad = next(iter(sorted(codec.stop_ids)))

    def _criteria(self, stop, prompt_len: int):
        codec, base = self.codec, self.transformers.StoppingCriteria

        class Stop(base):
            def __call__(self, input_ids, scores, **kwargs):
                done = []
                for i, row in enumerate(input_ids[:, prompt_len:].tolist()):
                    cut = next((j for j, t in enumerate(row) if t in codec.stop_ids), len(row))
                    done.append(cut < len(row) or stop(i, row[:cut]))
                return torch.tensor(done, device=input_ids.device)

        return self.transformers.StoppingCriteriaList([Stop()])

    def _vocab_limit(self):
        limit, base = self.codec.vocab_limit, self.transformers.LogitsProcessor

        class Limit(base):
            def __call__(self, input_ids, scores):
                scores[:, limit:] = float("-inf")
                return scores

        return self.transformers.LogitsProcessorList([Limit()])

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], stops: list[tuple[str, ...]], max_new: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[list[int]]:  # fmt: skip
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[list[int]] = [[] for _ in prompts]
        for b, a in enumerate(range(0, len(order), self.batch_size)):
            idx = order[a : a + self.batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: every prompt ends at column width - 1
                ids[r, width - len(prompts[i]) :] = torch.as_tensor(prompts[i])
                mask[r, width - len(prompts[i]) :] = 1
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
                "do_sample": False}  # fmt: skip
            torch.manual_seed(_batch_seed(seed, b))
            gen = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max_new,
                eos_token_id=sorted(self.codec.stop_ids), pad_token_id=self.pad, logits_processor=self._vocab_limit(),
                stopping_criteria=self._criteria(_stop_fn(self.codec, [stops[i] for i in idx]), width), **sampling,
            )  # fmt: skip
            for i, row in zip(idx, gen[:, width:].tolist()):
                out[i] = row[: next((j for j, t in enumerate(row) if t in self.codec.stop_ids), len(row))]
        return out


# ----------------------------------------------------------------------------------------------
# One model: generate, run, count


def limits_of(ccfg: CodeEvalConfig) -> Limits:
    return Limits(timeout_s=ccfg.timeout_s, memory_mb=ccfg.memory_mb)


def build_tasks(problems: list[he.Problem], ccfg: CodeEvalConfig) -> list[he.Task]:
    tasks = he.completion_tasks(problems) if (ccfg.greedy or ccfg.samples) else []
    for kind in ccfg.infill:
        tasks += he.infill_tasks(problems, kind, list(ccfg.fim_modes), ccfg.seed, ccfg.spans)
    return tasks


def generate_records(generator, codec: Codec, problems: list[he.Problem], ccfg: CodeEvalConfig,
                     progress: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """One record per completion: the task, the mode (greedy | sampled | psm | spm), the sample index,
    the prompt's length (and whether it was cut to fit) and the completion text, cut at its stop sequence."""
    tasks = build_tasks(problems, ccfg)
    records = []
    groups: list[tuple[str, list[he.Task], int, float, int]] = []  # (mode, tasks, samples each, temperature, new)
    completion = [t for t in tasks if t.benchmark == "humaneval"]
    infill = [t for t in tasks if t.benchmark != "humaneval"]
    new_c = min(ccfg.max_new_tokens, generator.max_len // 2)
    new_i = min(ccfg.infill_max_new_tokens, generator.max_len // 2)
    if ccfg.greedy and completion:
        groups.append(("greedy", completion, 1, 0.0, new_c))
    if ccfg.samples and completion:
        groups.append(("sampled", completion, ccfg.samples, ccfg.temperature, new_c))
    if infill:
        groups.append(("infill", infill, 1, 0.0, new_i))
    total = sum(len(g[1]) * g[2] for g in groups)
    with tqdm(total=total, desc="generate", unit="seq", disable=not progress, dynamic_ncols=True) as bar:
        for mode, group, n, temperature, new in groups:
            prompts = [he.prompt_ids(t, codec, generator.max_len - new) for t in group]
            if n == 1:
                outs = generator([p for p, _ in prompts], [t.stops for t in group], new)
                runs = [(t, p, 0, o) for t, p, o in zip(group, prompts, outs)]
            else:  # n samples of one problem per call, seeded by (seed, problem): independent of the others
                runs = []
                for t, p in zip(group, prompts):
                    outs = generator([p[0]] * n, [t.stops] * n, new, temperature, ccfg.top_p, seed=ccfg.seed * 100_003
                                     + t.problem)  # fmt: skip
                    runs += [(t, p, s, o) for s, o in enumerate(outs)]
            for t, (ids, cut), s, new_ids in runs:
                text = he.cut_at_stop(codec.completion(ids, new_ids), t.stops)
                records.append({"benchmark": t.benchmark, "mode": t.mode if mode == "infill" else mode,
                                "task_id": t.task_id, "problem": t.problem, "sample": s, "prompt_tokens": len(ids),
                                "prompt_cut": cut, "new_tokens": len(new_ids), "completion": text})  # fmt: skip
                bar.update(1)
    return records


def score_records(records: list[dict], problems: list[he.Problem], ccfg: CodeEvalConfig,
                  progress: bool = False) -> list[str]:  # fmt: skip
    """Run every record's program in the sandbox; adds status, reason and exact_match. Returns the sandbox
    layers that were in force."""
    tasks = {(t.benchmark, t.task_id, t.mode): t for t in build_tasks(problems, ccfg)}
    programs = []
    for r in records:
        task = tasks[(r["benchmark"], r["task_id"], "complete" if r["benchmark"] == "humaneval" else r["mode"])]
        programs.append(he.program(task, problems[task.problem], r["completion"]))
        r["exact_match"] = he.exact_match(task, r["completion"]) if task.mode != "complete" else None
    with tqdm(total=len(set(programs)), desc="execute", unit="prog", disable=not progress, dynamic_ncols=True) as bar:
        results = run_many(programs, limits_of(ccfg), ccfg.workers, progress=bar.update)
    for r, res in zip(records, results):
        r.update(status=res.status, reason=res.reason)
    return max((res.layers for res in results), key=len, default=[])


def summarize(records: list[dict], ccfg: CodeEvalConfig) -> list[dict[str, Any]]:
    """Rows per (benchmark, mode, k): pass@k (greedy and infilling: the pass rate), exact match, counts."""
    rows = []
    keys = list(dict.fromkeys((r["benchmark"], r["mode"]) for r in records))
    for bench, mode in keys:
        group = [r for r in records if r["benchmark"] == bench and r["mode"] == mode]
        counts = {s: sum(r["status"] == s for r in group) for s in ("passed", "failed", "timeout", "error")}
        per_task: dict[str, list[bool]] = {}
        for r in group:
            per_task.setdefault(r["task_id"], []).append(r["status"] == "passed")
        n = len(group) // len(per_task)
        ks = sorted(set(ccfg.k)) if mode == "sampled" else [1]
        exact = [r["exact_match"] for r in group if r["exact_match"] is not None]
        sampled = mode == "sampled"
        for k in ks:
            value = float(np.mean([he.pass_at_k(len(v), sum(v), k) for v in per_task.values()]))
            rows.append({
                "benchmark": bench, "mode": mode, "k": k, "pass_at_k": round(value, 6),
                "exact_match": round(float(np.mean(exact)), 6) if exact else "",
                "problems": len({r["problem"] for r in group}), "tasks": len(per_task), "samples_per_task": n,
                **counts, "prompts_cut": sum(r["prompt_cut"] for r in group),
                "temperature": ccfg.temperature if sampled else 0.0, "top_p": ccfg.top_p if sampled else 1.0,
            })  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------
# Outputs


SERIES = {("humaneval", "greedy"): "HumanEval pass@1 (greedy)", ("infill_single", "psm"): "infill single-line PSM",
          ("infill_single", "spm"): "infill single-line SPM", ("infill_multi", "psm"): "infill multi-line PSM",
          ("infill_multi", "spm"): "infill multi-line SPM"}  # fmt: skip


def save(rows: list[dict], records: list[dict], meta: dict, out_dir: Path,
         boundaries: list[tuple[float, str]] = ()) -> dict[str, Path]:  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"code_csv": write_csv(rows, out_dir / "code_eval.csv")}
    series: dict[str, tuple[list, list]] = {}
    for r in rows:
        name = SERIES.get((r["benchmark"], r["mode"]))
        if r["mode"] == "sampled":
            name = f"HumanEval pass@{r['k']} (T={r['temperature']:g}, n={r['samples_per_task']})"
        xs, ys = series.setdefault(name, ([], []))
        xs.append(float(r["tokens"] or 0))
        ys.append(r["pass_at_k"])
    files["code_png"] = plots.lines_over_training(
        {k: (np.array(x), np.array(y)) for k, (x, y) in series.items()}, out_dir / "code_eval.png",
        xlabel="training tokens", ylabel="pass rate (executed tests)", title="HumanEval and HumanEval infilling",
        boundaries=list(boundaries),
    )  # fmt: skip
    samples = out_dir / "code_eval_samples.jsonl.gz"
    with open(samples, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:  # mtime 0: same bytes
        for r in records:
            f.write((json.dumps(r, sort_keys=True) + "\n").encode())
    files["code_samples"] = samples
    files["code_json"] = out_dir / "code_eval.json"
    files["code_json"].write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    return files


def _meta(ccfg: CodeEvalConfig, layers: list[str], checkpoints: list[str], seconds: float, **extra) -> dict:
    return {"settings": asdict(ccfg), "dataset": he.dataset_info(), "sandbox": {**asdict(limits_of(ccfg)),
            "layers": layers}, "stop_sequences": list(he.STOP_SEQUENCES), "checkpoints": checkpoints,
            "git_commit": git_commit(), "seconds": round(seconds, 1), **extra}  # fmt: skip


def _checkpoint_columns(label: str, step, tokens, stage) -> dict[str, Any]:
    return {"checkpoint": label, "step": step, "tokens": tokens, "stage": stage}


def code_eval_timeline(timeline: Timeline, acfg: AnalysisConfig, out_dir: Path, log=print) -> dict[str, Path]:
    """Every checkpoint of the timeline, in training order."""
    ccfg, device = acfg.code, resolve_device(acfg.device)
    problems = he.load_problems(ccfg.problems)
    rows, records, layers, start = [], [], [], time.monotonic()
    for ref in timeline.checkpoints:
        codec = Codec.from_crystal(checkpoint_tokenizer(ref))
        model = load_model(ref, device)
        recs = generate_records(CrystalGenerator(model, codec, ccfg.batch_size), codec, problems, ccfg, acfg.progress)
        del model
        layers = score_records(recs, problems, ccfg, acfg.progress) or layers
        cols = _checkpoint_columns(ref.label, ref.global_step, ref.global_tokens, ref.stage)
        rows += [{**cols, **r} for r in summarize(recs, ccfg)]
        records += [{**cols, **r} for r in recs]
        log(f"{ref.label}: " + ", ".join(f"{r['benchmark']}/{r['mode']} pass@{r['k']} {r['pass_at_k']:.3f}"
                                          for r in rows if r["checkpoint"] == ref.label))  # fmt: skip
    meta = _meta(ccfg, layers, [c.label for c in timeline.checkpoints], time.monotonic() - start,
                 paths=[str(r.path) for r in timeline.runs])  # fmt: skip
    marks = [(tokens, f"stage {stage}") for _, tokens, stage in timeline.stage_boundaries]
    return save(rows, records, meta, out_dir, marks)


def code_eval(paths: list[str], acfg: AnalysisConfig, out: Path | None = None, log=print) -> dict[str, Path]:
    """The command on runs / releases: results into `out`, or into the last release (and its manifest), or
    into <first run>/analysis."""
    timeline = build_timeline(paths).select(acfg.checkpoints)
    last = Path(paths[-1])
    into_release = out is None and (last / "manifest.json").is_file() and timeline.runs[-1].kind == "release"
    if out is None:
        from crystal.release import EVALS_DIR

        out = last / EVALS_DIR if into_release else Path(paths[0]) / "analysis"
    log(f"code-eval: {len(timeline.checkpoints)} checkpoints from {', '.join(paths)} -> {out}")
    files = code_eval_timeline(timeline, acfg, out, log)
    if into_release:
        from crystal.release import add_evaluation

        add_evaluation(last, "code_eval", list(files.values()), {
            "command": "python -m crystal.analysis code-eval", "checkpoints": [c.label for c in timeline.checkpoints],
        })  # fmt: skip
        log(f"code-eval: added {len(files)} files to {last}/manifest.json")
    return files


def code_eval_hf(hf_dir: Path, acfg: AnalysisConfig, out: Path | None = None, log=print) -> dict[str, Path]:
    """The same evaluation of a transformers model directory (AutoModelForCausalLM, trust_remote_code)."""
    from crystal.hf import import_transformers

    transformers = import_transformers()
    ccfg, device, hf_dir = acfg.code, resolve_device(acfg.device), Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise AnalysisError(f"{hf_dir} has no config.json; pass a directory from `python -m crystal.hf export`")
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=dtype).to(device)
    model.eval()
    codec = Codec.from_hf(tok)
    if ccfg.infill and len(codec.fim_ids) < 3:
        raise AnalysisError(f"{hf_dir}'s tokenizer has no FIM tokens; set code.infill=[] to run HumanEval only")
    problems = he.load_problems(ccfg.problems)
    start = time.monotonic()
    records = generate_records(HFGenerator(model, codec, ccfg.batch_size), codec, problems, ccfg, acfg.progress)
    layers = score_records(records, problems, ccfg, acfg.progress)
    info = json.loads((hf_dir / "config.json").read_text()).get("crystal", {})
    cols = _checkpoint_columns(hf_dir.name, info.get("step", ""), info.get("tokens", ""), info.get("stage", ""))
    rows = [{**cols, **r} for r in summarize(records, ccfg)]
    for r in rows:
        log(f"{hf_dir.name} (transformers): {r['benchmark']}/{r['mode']} pass@{r['k']} {r['pass_at_k']:.3f}")
    meta = _meta(ccfg, layers, [hf_dir.name], time.monotonic() - start, hf_dir=str(hf_dir), via="transformers")
    return save(rows, [{**cols, **r} for r in records], meta, out or hf_dir / "evals")


def reference(acfg: AnalysisConfig, log=print) -> bool:
    """The harness checking itself: every task's canonical text as the completion. Each must pass; the
    infilling references must also match exactly."""
    ccfg = acfg.code
    problems = he.load_problems(ccfg.problems)
    records = []
    for t in build_tasks(problems, ccfg):
        mode = t.mode if t.benchmark != "humaneval" else "reference"
        records.append({"benchmark": t.benchmark, "mode": mode, "task_id": t.task_id, "problem": t.problem,
                        "completion": t.reference})  # fmt: skip
    start = time.monotonic()
    layers = score_records(records, problems, ccfg, acfg.progress)
    seconds = time.monotonic() - start
    ok = True
    for bench in dict.fromkeys(r["benchmark"] for r in records):
        group = [r for r in records if r["benchmark"] == bench]
        passed = sum(r["status"] == "passed" for r in group)
        exact = sum(bool(r["exact_match"]) for r in group)
        label = "" if bench == "humaneval" else f"{bench}: "
        log(f"{label}passed {passed}/{len(group)}" + ("" if bench == "humaneval" else f", exact {exact}/{len(group)}"))
        ok &= passed == len(group) and (bench == "humaneval" or exact == len(group))
        for r in group:
            if r["status"] != "passed":
                log(f"  {r['task_id']} {r['mode']}: {r['status']}: {r['reason']}")
    log(f"{len(records)} tasks in {seconds:.1f} s, {ccfg.workers or default_workers()} programs at a time; sandbox: "
        f"{', '.join(layers)}")  # fmt: skip
    return ok
