"""backend=cerebras: the same model, data and schedule run through cerebras-pytorch (cstorch).

What differs from the resident engine is only how the step is compiled, run and checkpointed:

    model       cstorch.compile(model, cstorch.backend(CPU | GPU | CSX))
    step        @cstorch.trace: forward/backward over the step's micro-batches, global-norm clipping,
                cstorch AdamW, LR scheduler step; a non-finite step is undone inside the graph
    data        cstorch.utils.data.DataLoader(input_fn, ...) inside a cstorch DataExecutor; input_fn
                builds the project's own loader at the trainer's cursor (on CSX it runs on the
                cluster's input workers, so it must build everything from its arguments)
    optimizer   cstorch.optim.AdamW, one param group per muP group (lr multiplier in
                "adjust_learning_rate", as Cerebras' Model Zoo spells it)
    LR          ScalePerParamLR(SequentialLR([LinearLR warmup, LinearLR decay])): the trainer's
                schedule, evaluated in the graph (fp32)
    precision   cstorch.amp: set_half_dtype + autocast (bf16 on CPU/GPU; the CSX compiler casts itself)
    state       the engines' flat {name: tensor} dicts, so checkpoints move between this engine and
                the others; cerebras_state.py converts to and from cstorch's own checkpoint layout

Where cstorch's AdamW differs from torch's: epsilon is added to sqrt(v) before bias correction, so the
effective eps is eps / sqrt(1 - beta2^t) (4.5x larger at t = 1 for beta2 = 0.95); weight decay, moments
and bias correction are torch's up to rounding. At CrystalCoder's eps = 1e-9 that only matters for
parameters whose gradients are numerical noise of that size (e.g. the key biases outside the rotary dims,
which softmax makes invariant), where Adam's normalisation turns the difference into visible updates;
on the tiny model the losses then differ from backend=resident by a machine-dependent 5e-4 to 4e-3
relative over 20 steps. CerebrasSettings.adamw="torch" keeps cstorch's optimizer and state but uses torch's
equation: then the losses agree to fp32 rounding (the caller picks it: crystal's adamw=auto does on
CPU/GPU; docs/cerebras.md has the analysis and tests/test_cerebras_lane.py the measurements).
The bias-correction powers are fp32 state (cerebras_state.py converts them to step counts) and the
LR is computed in the graph in fp32 (relative 1e-7 from the trainer's float64 schedule).

Nothing here imports crystal: the caller hands in the model adapter, the muP groups, the schedule and
a data plan (how to pack micro-batches into tensors and which input function cstorch should run).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from crystal.streaming.backends.base import AdamWSettings, ParamGroupSpec, StepResult, StreamableModel
from crystal.streaming.backends.cerebras_state import (
    cstorch_to_flat,
    flat_to_cstorch,
    powers_for_step,
    step_from_powers,
)

VENV_HINT = (
    "python3.11 -m venv .venv-cerebras && .venv-cerebras/bin/pip install -e '.[cerebras,dev]' "
    "(docs/cerebras.md), then run with .venv-cerebras/bin/python"
)


class CstorchUnavailable(RuntimeError):
    """cerebras-pytorch cannot be imported in this environment."""


def cstorch_available() -> bool:
    """True when cerebras.pytorch is installed here (checked without importing it)."""
    try:
        return importlib.util.find_spec("cerebras.pytorch") is not None
    except ModuleNotFoundError:  # no `cerebras` namespace at all
        return False


def import_cstorch():
    if not cstorch_available():
        raise CstorchUnavailable(
            f"backend=cerebras needs cerebras-pytorch 2.10.0, which is not installed in this environment "
            f"(torch {torch.__version__}); it needs its own venv: {VENV_HINT}"
        )
    import cerebras.pytorch as cstorch

    return cstorch


# ----------------------------------------------------------------------------------------------
# What the caller hands in


@dataclass
class LinearSchedule:
    """Linear warmup to `lr` over `warmup_steps` (update k gets lr * (k+1) / warmup), then linear decay to
    `final_lr` over `decay_steps`, flat after: the trainer's schedule, restated for cstorch."""

    lr: float
    final_lr: float
    warmup_steps: int
    decay_steps: int

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        frac = min(1.0, (step - self.warmup_steps) / max(1, self.decay_steps))
        return self.lr + (self.final_lr - self.lr) * frac


@dataclass
class CerebrasSettings:
    target: str = "CPU"  # CPU | GPU | CSX
    cluster: dict[str, Any] = field(default_factory=dict)  # cstorch ClusterConfig fields (CSX)
    artifact_dir: str = "cerebras"
    compile_dir: str | None = None
    compile_only: bool = False
    half_dtype: str = "bfloat16"
    skip_nonfinite: bool = True
    adamw: str = "torch"  # torch: cstorch's AdamW state with torch.optim.AdamW's equation | cstorch: its own


@dataclass
class CerebrasRun:
    """One cstorch DataExecutor: where it starts and what feeds it."""

    input_fn: Callable[..., Iterable[dict[str, torch.Tensor]]]  # a module-level function (shipped to CSX workers)
    input_args: tuple
    start_step: int  # global step of its first update (positions the LR schedule)
    num_steps: int
    checkpoint_steps: int | None = None  # steps at which the trainer saves (CSX keeps weights readable there)


class CerebrasDataPlan(Protocol):
    """How the caller's batches meet cstorch: tensors in, model arguments out."""

    def open_run(self, first_micro_batches: list[Any]) -> CerebrasRun: ...

    # The global step the trainer's micro-batches belong to (a resume, rollback or skipped data window
    # moves it; the engine then opens a new run there).
    def step_of(self, micro_batches: list[Any]) -> int: ...

    # The step's micro-batches as a dict of stacked tensors, (A, B, S) each: what input_fn yields.
    def pack(self, micro_batches: list[Any]) -> dict[str, torch.Tensor]: ...

    # Positional arguments for which model(*args) returns micro-batch i's mean loss.
    def model_inputs(self, packed: dict[str, torch.Tensor], i: int) -> tuple: ...


# ----------------------------------------------------------------------------------------------
# The engine


def torch_equation_adamw(cstorch):
    """cstorch.optim.AdamW with torch.optim.AdamW's update equation (backend.cerebras.adamw=torch).

    Same state (exp_avg, exp_avg_sq, beta1^(t+1), beta2^(t+1)), same in-graph tensors, so it compiles
    for CSX like the original; only the update differs: decoupled decay first, then eps added to the
    bias-corrected sqrt(v), as torch does. With it backend=cerebras matches backend=resident to fp32
    rounding, so a run can move between Cerebras and GPU without a change of optimizer."""

    class TorchEquationAdamW(cstorch.optim.AdamW):
        @torch.no_grad()
        def step(self, closure=None):
            loss = closure() if closure is not None else None
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                    exp_avg.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                    bias_correction1 = 1.0 - state["beta1_power"]
                    bias_correction2 = 1.0 - state["beta2_power"]
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                    denom = (exp_avg_sq.sqrt() / bias_correction2.sqrt()).add_(group["eps"])
                    p.sub_(exp_avg / denom * (group["lr"] / bias_correction1))
                    state["beta1_power"] *= beta1
                    state["beta2_power"] *= beta2
            return loss

    return TorchEquationAdamW


def _backend(cstorch, s: CerebrasSettings):
    """cstorch allows one backend per process: reuse it when it is the requested kind."""
    current = cstorch.current_backend(raise_exception=False, raise_warning=False)
    if current is not None:
        if current.backend_type.name != s.target:
            raise RuntimeError(
                f"this process already runs a cstorch {current.backend_type.name} backend; "
                f"backend.cerebras.target={s.target} needs a new process"
            )
        current.artifact_dir = Path(s.artifact_dir)
        return current
    if s.target == "CSX":
        from cerebras.pytorch.distributed import ClusterConfig

        cluster = ClusterConfig(**s.cluster)
        return cstorch.backend(
            "CSX", artifact_dir=s.artifact_dir, compile_dir=s.compile_dir, compile_only=s.compile_only,
            cluster_config=cluster,
        )  # fmt: skip
    return cstorch.backend(s.target, artifact_dir=s.artifact_dir)


class CerebrasEngine:
    """The resident engine's contract (train_step, eval_loss, state_dict) over a cstorch-compiled step."""

    def __init__(
        self,
        adapter: StreamableModel,
        groups: list[ParamGroupSpec],
        settings: AdamWSettings,
        cerebras: CerebrasSettings,
        schedule: LinearSchedule,
        data: CerebrasDataPlan,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        cstorch = self.cstorch = import_cstorch()
        self.adapter, self.settings, self.cs, self.schedule, self.data = adapter, settings, cerebras, schedule, data
        Path(cerebras.artifact_dir).mkdir(parents=True, exist_ok=True)
        self.backend = _backend(cstorch, cerebras)
        self.is_csx = cerebras.target == "CSX"
        self.model = adapter.model
        self.named = dict(self.model.named_parameters())
        grouped = [n for g in groups for n in g.param_names]
        if sorted(grouped) != sorted(self.named):
            raise ValueError(
                f"parameter groups do not cover the model exactly: {sorted(set(self.named) ^ set(grouped))[:5]}"
            )
        self.groups = [g for g in groups if g.param_names]
        self.mixed_precision = autocast_dtype is not None
        if self.mixed_precision:
            cstorch.amp.set_half_dtype(cerebras.half_dtype)

        # compile() moves the model to the backend's device; parameters must be initialised before.
        self.compiled = cstorch.compile(self.model, self.backend)
        self.device = self.backend.torch_device
        adamw = torch_equation_adamw(cstorch) if cerebras.adamw == "torch" else cstorch.optim.AdamW
        self.optimizer = adamw(
            [
                {"params": [self.named[n] for n in g.param_names], "weight_decay": g.weight_decay,
                 "adjust_learning_rate": g.lr_scale, "name": g.name}
                for g in self.groups
            ],
            lr=schedule.lr, betas=tuple(settings.betas), eps=settings.eps, weight_decay=0.0, correct_bias=True,
        )  # fmt: skip
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.param_names = {p: n for n, p in self.named.items()}
        self._build_schedule()
        self.step = 0  # global step of the next update (the LR schedule's position)
        self.adam_steps = 0  # updates applied (not skipped); stands in once the bias powers underflow
        self._traced_step = cstorch.trace(self._step_graph)
        self._executor_batches: Iterator | None = None
        self._pending: dict[str, torch.Tensor] | None = None
        self._run: CerebrasRun | None = None
        self._result: tuple[float, float, bool] | None = None
        self._next_step = 0  # global step the open run's input function yields next

    # -- LR schedule ------------------------------------------------------------------------------

    def _build_schedule(self) -> None:
        lrs = self.cstorch.optim.lr_scheduler
        s = self.schedule
        decay = lrs.LinearLR(self.optimizer, initial_learning_rate=s.lr, end_learning_rate=s.final_lr,
                             total_iters=max(1, s.decay_steps))  # fmt: skip
        self._warmup = None
        if s.warmup_steps > 0:
            # Update k (0-based) of the warmup gets lr * (k+1) / warmup: LinearLR from lr/w to lr over w-1.
            self._warmup = lrs.LinearLR(self.optimizer, initial_learning_rate=s.lr / s.warmup_steps,
                                        end_learning_rate=s.lr, total_iters=max(1, s.warmup_steps - 1))  # fmt: skip
            self._sequence = lrs.SequentialLR(self.optimizer, [self._warmup, decay], milestones=[s.warmup_steps])
        else:
            self._sequence = decay
        self._decay = decay
        # muP: each group's LR is the schedule times its "adjust_learning_rate".
        self.scheduler = lrs.ScalePerParamLR(self.optimizer, self._sequence)

    def _position_schedule(self, step: int) -> None:
        """Point every scheduler at global step `step` (what stepping it `step` times would give)."""
        w = self.schedule.warmup_steps

        def at(value: int) -> torch.Tensor:
            return torch.tensor(value, dtype=torch.int64, device=self.device)

        self.scheduler.last_epoch = at(step)
        if self._warmup is not None:
            self._sequence.last_epoch = at(step)
            self._warmup.last_epoch = at(step)
            self._decay.last_epoch = at(max(0, step - w))
        else:
            self._decay.last_epoch = at(step)
        self.scheduler.update_last_value()
        self.step = step

    def scheduled_lr(self) -> float:
        """The schedule's LR for the next update (the group with multiplier 1 if any)."""
        g = next((g for g in self.optimizer.param_groups if g["adjust_learning_rate"] == 1.0),
                 self.optimizer.param_groups[0])  # fmt: skip
        return float(g["lr"]) / g["adjust_learning_rate"]

    # -- the compiled step ------------------------------------------------------------------------

    def _autocast(self):
        return self.cstorch.amp.autocast() if self.mixed_precision else contextlib.nullcontext()

    def _step_graph(self, packed: dict[str, torch.Tensor]):
        """Traced once per step on CPU/GPU, compiled once for CSX: no Python branch may depend on a value."""
        n = packed["input_ids"].shape[0]  # micro-batches in this step
        total = None
        for i in range(n):
            with self._autocast():
                loss = self.compiled(*self.data.model_inputs(packed, i))
            (loss / n).backward()
            total = loss.detach().float() if total is None else total + loss.detach().float()
        mean = total / n
        clip = self.settings.grad_clip if self.settings.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        # cstorch's GradScaler tests finiteness as `x < inf` (torch.isfinite does not lower); NaN fails it too.
        inf = torch.tensor(math.inf, device=mean.device)
        finite = (mean < inf) & (norm.float() < inf)
        if self.cs.skip_nonfinite:
            # Keep the old values and select them back if the step was not finite: the graph-side
            # equivalent of the resident engine skipping optimizer.step() on the host.
            kept = [(t, t.detach().clone()) for t in self._updated_tensors()]
        self.optimizer.step()
        if self.cs.skip_nonfinite:
            with torch.no_grad():
                for t, old in kept:
                    t.copy_(torch.where(finite, t, old))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._record(mean, norm, finite)
        return mean

    def _updated_tensors(self) -> list[torch.Tensor]:
        out = []
        for p in self.params:
            out.append(p)
            out.extend(v for v in self.optimizer.state[p].values() if torch.is_tensor(v))
        return out

    def _record(self, mean, norm, finite) -> None:
        @self.cstorch.step_closure
        def record(mean: torch.Tensor, norm: torch.Tensor, finite: torch.Tensor) -> None:
            self._result = (float(mean), float(norm), bool(finite))

        record(mean, norm, finite)

    # -- run lifecycle: a cstorch DataExecutor over the input function -----------------------------

    def _open_run(self, micro_batches: list[Any]) -> None:
        cstorch = self.cstorch
        run = self._run = self.data.open_run(micro_batches)
        self._position_schedule(run.start_step)
        self._next_step = run.start_step
        loader = cstorch.utils.data.DataLoader(run.input_fn, *run.input_args)
        executor = cstorch.utils.data.DataExecutor(
            loader, num_steps=run.num_steps, checkpoint_steps=run.checkpoint_steps or None
        )
        self._executor_batches = iter(executor)
        self._pending = next(self._executor_batches)

    def _advance(self) -> None:
        """Finish the current step in cstorch's terms (step closures run, so its loss is known) and take
        the next batch from the input function, or end the run after its last step."""
        try:
            self._pending = next(self._executor_batches)
        except StopIteration:
            self._executor_batches, self._pending = None, None

    def close(self) -> None:
        """End an unfinished run (its executor writes its logs and releases the backend's run state)."""
        if self._executor_batches is not None:
            self._executor_batches.close()
        self._executor_batches, self._pending = None, None

    # -- the engine contract ----------------------------------------------------------------------

    def train_step(self, micro_batches: list[Any], lr: float) -> StepResult:
        self.model.train()
        if self._pending is not None and self.data.step_of(micro_batches) != self._next_step:
            self.close()  # the trainer moved its cursor (rollback, skipped window): a new run from there
        if self._pending is None:
            self._open_run(micro_batches)
        batch = self._pending
        tokens = sum(self.adapter.num_tokens(mb) for mb in micro_batches)
        if not self.is_csx:
            # cstorch streamed this step from its own copy of the loader: it must be the trainer's step.
            mine = self.data.pack(micro_batches)["input_ids"]
            if not torch.equal(batch["input_ids"].cpu(), mine):
                raise RuntimeError(
                    f"cstorch's DataLoader produced different samples than the trainer's loader at step {self.step}; "
                    "the input function and the trainer disagree on the data order"
                )
            if not math.isclose(self.scheduled_lr(), lr, rel_tol=1e-5, abs_tol=1e-12):
                raise RuntimeError(
                    f"cstorch's LR schedule gives {self.scheduled_lr():.8g} at step {self.step}, the trainer "
                    f"{lr:.8g}; the schedule handed to the engine does not match optim.*"
                )
        self._result = None
        self._traced_step(batch)
        self._advance()
        if self._result is None:
            raise RuntimeError("cstorch ran the step but its step closure did not report the loss")
        loss, norm, finite = self._result
        self.step += 1
        self._next_step += 1
        self.adam_steps += int(finite)
        return StepResult(loss, norm, not finite, tokens)

    @torch.no_grad()
    def eval_loss(self, batch: Any) -> float:
        if self.is_csx:
            raise ValueError(
                "evaluation between training steps is not supported on CSX (one compiled graph per run); set "
                "train.eval_every above train.steps and evaluate a checkpoint with backend=resident"
            )
        # Eager on CPU/GPU, outside the traced step: the module itself, not the compiled wrapper, so that
        # evaluating never registers the model as the backend's active one outside a run.
        self.model.eval()
        try:
            packed = {k: v.to(self.device) for k, v in self.data.pack([batch]).items()}
            with self._autocast():
                return float(self.model(*self.data.model_inputs(packed, 0)))
        finally:
            self.model.train()

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return cstorch_flat(self.cstorch_state_dict(), self.groups, self.adam_steps)

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]], load_optimizer: bool = True) -> None:
        self.close()  # new weights (a resume or rollback): the next step opens a new run
        steps = {float(v) for k, v in state.get("optimizer", {}).items() if k.endswith(".step")}
        native = flat_to_cstorch(
            state["model"], state.get("optimizer", {}) if load_optimizer else {}, self.groups,
            self.settings.betas, self.settings.eps, global_step=self.step,
        )  # fmt: skip
        self.load_cstorch_state_dict(native, load_optimizer=load_optimizer)
        self.adam_steps = int(max(steps)) if steps and load_optimizer else 0

    def cstorch_state_dict(self) -> dict[str, Any]:
        """cstorch's own checkpoint layout (what cstorch.save writes): model, optimizer, global_step."""

        def to_cpu(tree):  # tensors fetched from the device (on CSX: from the appliance); the rest as is
            return torch.utils._pytree.tree_map_only(torch.Tensor, self.backend.to_cpu, tree)

        return {
            "model": {k: to_cpu(v) for k, v in self.model.state_dict().items()},
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "global_step": torch.tensor(self.step, dtype=torch.int64),
        }

    def load_cstorch_state_dict(self, state: dict[str, Any], load_optimizer: bool = True) -> None:
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        if not load_optimizer:
            return
        sd = self.optimizer.state_dict()  # this optimizer's groups and numbering; values from `state`
        saved = state["optimizer"]
        sizes = [len(g["params"]) for g in saved["param_groups"]]
        if sizes != [len(g["params"]) for g in sd["param_groups"]]:
            raise ValueError(f"optimizer state holds groups of {sizes} parameters; this model's are different")
        fresh = dict(zip(("beta1_power", "beta2_power"), powers_for_step(0, self.settings.betas)))
        new_state = {}
        for index, p in enumerate(self.params):
            entry = saved["state"].get(index)
            if not entry:  # never stepped: the state a fresh cstorch AdamW starts from
                entry = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p), **fresh}
            elif "beta1_power" not in entry:
                raise ValueError(f"optimizer state of {self.param_names[p]!r} has no bias-correction powers")
            new_state[index] = {k: entry[k] for k in ("exp_avg", "exp_avg_sq", "beta1_power", "beta2_power")}
        sd["state"] = new_state
        self.optimizer.load_state_dict(sd)
        if "global_step" in state:
            self.step = int(state["global_step"])
        self._position_schedule(self.step)


def cstorch_flat(
    native: dict[str, Any], groups: Sequence[ParamGroupSpec], adam_steps: int
) -> dict[str, dict[str, torch.Tensor]]:
    model, optimizer = cstorch_to_flat({**native, "crystal": None}, groups, adam_steps=adam_steps)
    return {"model": model, "optimizer": optimizer}


__all__ = [
    "CerebrasDataPlan",
    "CerebrasEngine",
    "CerebrasRun",
    "CerebrasSettings",
    "CstorchUnavailable",
    "LinearSchedule",
    "cstorch_available",
    "import_cstorch",
    "step_from_powers",
]
