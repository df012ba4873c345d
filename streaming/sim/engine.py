"""A small discrete-event engine: tasks on lanes with dependencies, run as the hardware would.

Each lane (compute, h2d, d2h, optimizer, reduce) runs its tasks one at a time in the order they
were added, like a CUDA stream or a worker thread; a task starts when its lane is free and its
dependencies have finished. Two couplings make lanes share hardware:

- `serial=True`: one task at a time across all lanes, the earliest-added ready one first (a CPU
  device: copies, compute and optimizer run on the same cores, in program order).
- `shared=(lane_a, lane_b, factor)`: while both lanes are busy each runs at `factor` of its own
  rate (PCIe: H2D and D2H at once reach duplex / (h2d + d2h) of their one-way rates).

Time advances from one start/finish to the next, so a slowdown applies only while it overlaps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LANES = ("compute", "h2d", "d2h", "optimizer", "reduce")


@dataclass
class Task:
    id: int
    lane: str
    name: str
    work_s: float  # duration alone on its lane at full rate
    deps: tuple[int, ...]
    block: int | None
    step: int
    start_s: float = -1.0
    end_s: float = -1.0


@dataclass
class Engine:
    serial: bool = False
    shared: tuple[str, str, float] | None = None
    tasks: list[Task] = field(default_factory=list)

    def add(self, lane: str, name: str, work_s: float, deps=(), block: int | None = None, step: int = 0) -> int:
        if work_s < 0:
            raise ValueError(f"task {name}: negative duration {work_s}")
        deps = tuple(d for d in deps if d is not None)
        task = Task(len(self.tasks), lane, name, float(work_s), deps, block, step)
        self.tasks.append(task)
        return task.id

    def run(self) -> list[Task]:
        queues: dict[str, list[Task]] = {}
        for t in self.tasks:
            queues.setdefault(t.lane, []).append(t)
        heads = {lane: 0 for lane in queues}
        done = [False] * len(self.tasks)
        active: dict[str, list] = {}  # lane -> [task, remaining work]
        now, left = 0.0, len(self.tasks)
        while left:
            # start every lane head whose dependencies are done (earliest-added first)
            ready = [q[heads[lane]] for lane, q in queues.items() if lane not in active and heads[lane] < len(q)]
            for task in sorted(ready, key=lambda t: t.id):
                if self.serial and active:
                    break
                if all(done[d] for d in task.deps):
                    task.start_s = now
                    active[task.lane] = [task, task.work_s]
            if not active:
                stuck = sorted(ready, key=lambda t: t.id)[0]
                raise RuntimeError(f"schedule deadlock at task {stuck.name} (lane {stuck.lane}, deps {stuck.deps})")
            rate = dict.fromkeys(active, 1.0)
            if self.shared and self.shared[0] in active and self.shared[1] in active:
                rate[self.shared[0]] = rate[self.shared[1]] = self.shared[2]
            dt = min(rem / rate[lane] for lane, (_, rem) in active.items())
            now += dt
            for lane in list(active):
                entry = active[lane]
                entry[1] -= dt * rate[lane]
                if entry[1] <= 1e-12 * max(1.0, entry[0].work_s):
                    task = entry[0]
                    task.end_s = now
                    done[task.id] = True
                    left -= 1
                    heads[lane] += 1
                    del active[lane]
        return self.tasks
