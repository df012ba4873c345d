"""Command line of the simulator (python -m crystal.streaming.sim ...); see streaming/sim/__init__.py."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from pathlib import Path

from crystal.streaming.sim.profile import ClusterProfile, RunDefaults, load_profile
from crystal.streaming.sim.shapes import ModelShape, load_shape
from crystal.streaming.sim.timing import Prediction, simulate

CRYSTALCODER_TOKENS = 1_392_000_000_000  # DESIGN.md: 321,836 steps x 4,325,376 tokens = 1.392T
ALIASES = {"num_cs2": "replicas", "gpus": "replicas"}
RUN_KEYS = {f.name: f.type for f in fields(RunDefaults)}


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_overrides(items: list[str], extra_keys: tuple[str, ...] = ()) -> dict:
    """key=value items -> {"model": .., "cluster": .., "run": {..}, "model_over": {..}, "cluster_over": {..}}."""
    out: dict = {"model": None, "cluster": None, "run": {}, "model_over": {}, "cluster_over": {}, "extra": {}}
    known = ["model", "cluster", *RUN_KEYS, *ALIASES, *extra_keys, "model.<key>", "cluster.<section>.<key>"]
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r}: overrides are key=value; known keys: {', '.join(known)}")
        value = _value(text)
        if key in ("model", "cluster"):
            out[key] = text
        elif key.startswith("model."):
            out["model_over"][key[6:]] = value
        elif key.startswith("cluster."):
            out["cluster_over"][key[8:]] = value
        elif key in extra_keys:
            out["extra"][key] = value
        elif ALIASES.get(key, key) in RUN_KEYS:
            name = ALIASES.get(key, key)
            kind = RUN_KEYS[name]
            if kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
                raise ValueError(f"{key}={text!r} must be an integer")
            if kind == "bool" and not isinstance(value, bool):
                raise ValueError(f"{key}={text!r} must be true or false")
            out["run"][name] = text if kind == "str" else value
        else:
            raise ValueError(f"unknown key {key!r}; known keys: {', '.join(known)}")
    return out


def resolve(items: list[str], default_model: str = "crystalcoder_7b", default_cluster: str = "cg1",
            extra_keys: tuple[str, ...] = ()) -> tuple[ModelShape, ClusterProfile, RunDefaults, dict]:  # fmt: skip
    o = parse_overrides(items, extra_keys)
    shape = load_shape(o["model"] or default_model, o["model_over"])
    prof = load_profile(o["cluster"] or default_cluster, o["cluster_over"])
    run = replace(prof.run, **o["run"])
    run.validate("command line")
    return shape, prof, run, o["extra"]


def _gb(b: float) -> str:
    return f"{b / 1e9:,.2f} GB"


def _duration(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:,.1f} days" if days >= 1 else f"{seconds / 3600:,.1f} hours"


def report(p: Prediction) -> str:
    r, s, dev = p.run, p.shape, p.profile.device
    lines = [
        f"{s.name} ({s.params / 1e9:.2f}B params, {s.n_layer} layers) on {p.profile.name}: {r.replicas} x {dev.name}",
        f"schedule {r.schedule}, prefetch {r.prefetch}, recompute {'on' if r.recompute else 'off'}, "
        f"stream {r.stream_dtype}, grads {r.grad_dtype}",
        f"batch {r.batch} x seq {p.seq} x {r.micro_batches} micro-batches x {r.replicas} replicas = "
        f"{p.tokens_per_step:,} tokens/step",
        "",
    ]
    rows = [
        ("step time", f"{p.step_s:.4g} s"),
        ("tokens/s", f"{p.tokens_s:,.0f}"),
        ("MFU", f"{100 * p.mfu:.1f} % ({s.flops_per_token(p.seq) / 1e9:.1f} GFLOP/token, "
                f"peak {dev.peak_tflops:g} TFLOP/s per device)"),
        ("bottleneck", f"{p.bottleneck} (busy {100 * p.busy_s[p.bottleneck] / p.step_s:.0f}% of the step)"),
        ("exposed", f"{p.exposed_s:.4g} s of the step not covered by compute"),
    ]  # fmt: skip
    rows += [(f"  {lane}", f"{t:.4g} s busy ({100 * t / p.step_s:.0f}%)") for lane, t in p.busy_s.items()]
    for tier, cap in (("device", dev.memory_gb * 1e9), ("host", p.profile.host.memory_gb * 1e9)):
        items = {k.split(": ", 1)[1]: v for k, v in p.memory.items() if k.startswith(tier)}
        rows.append((f"memory ({tier})", f"{_gb(sum(items.values()))} of {_gb(cap)}"))
        rows += [(f"  {k}", _gb(v)) for k, v in items.items() if v]
    if p.micro_note:
        rows.append(("micro-batches", p.micro_note))
    rows.append(("fits", "yes" if p.fits else f"NO: {p.fit_note}"))
    rows.append(("1.392T tokens", f"{_duration(CRYSTALCODER_TOKENS / p.tokens_s)} (CrystalCoder's three stages)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(lines + [f"{k:<{width}}  {v}" for k, v in rows])


def cmd_predict(args: argparse.Namespace) -> int:
    shape, prof, run, _ = resolve(args.overrides)
    p = simulate(shape, prof, run)
    print(report(p))
    if args.trace:
        from crystal.streaming.sim.trace import write_chrome_trace

        print(f"trace: {write_chrome_trace(p.events, args.trace, f'{shape.name} on {prof.name} (simulated)')}")
    if args.plot:
        from crystal.streaming.sim.trace import plot_timeline

        title = f"{shape.name} on {prof.name}: one step, {run.schedule}, prefetch {run.prefetch} (simulated)"
        print(f"plot: {plot_timeline(p.events, args.plot, title)}")
    return 0 if p.fits else 2


def cmd_calibrate(args: argparse.Namespace) -> int:
    from crystal.streaming.sim.calibrate import calibrate

    path = calibrate(args.out, args.budget_s, args.threads)
    print(f"wrote {path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from crystal.streaming.sim.sweep import sweep

    for path in sweep(args.out_dir, args.overrides):
        print(f"wrote {path}")
    return 0


SENSITIVITY = {
    "matmul + attention rate": lambda p, k: replace(p, device=replace(
        p.device, matmul_tflops=[[g, r * k] for g, r in p.device.matmul_tflops],
        matmul_bwd_tflops=[[g, r * k] for g, r in p.device.matmul_bwd_tflops],
        attention_fwd_tflops=p.device.attention_fwd_tflops * k,
        attention_bwd_tflops=p.device.attention_bwd_tflops * k)),
    "weight/grad link (h2d, d2h)": lambda p, k: replace(p, link=replace(
        p.link, h2d_gbps=p.link.h2d_gbps * k, d2h_gbps=p.link.d2h_gbps * k, duplex_gbps=p.link.duplex_gbps * k)),
    "host optimizer rate": lambda p, k: replace(p, host=replace(
        p.host, optimizer_mparams_per_s=p.host.optimizer_mparams_per_s * k)),
    "reduce network": lambda p, k: replace(p, network=replace(
        p.network, inter_node_gbps=p.network.inter_node_gbps * k, intra_node_gbps=p.network.intra_node_gbps * k)),
    "device memory bandwidth": lambda p, k: replace(p, device=replace(p.device, memory_gbps=p.device.memory_gbps * k)),
}  # fmt: skip


def sensitivity(shape: ModelShape, prof: ClusterProfile, run: RunDefaults) -> list[tuple[str, float, float]]:
    """(input, tokens/s change when it is halved, when it is doubled), largest effect first."""
    base = simulate(shape, prof, run).tokens_s
    rows = []
    for name, scale in SENSITIVITY.items():
        lo, hi = (simulate(shape, scale(prof, k), run).tokens_s / base - 1 for k in (0.5, 2.0))
        rows.append((name, lo, hi))
    return sorted(rows, key=lambda r: -max(abs(r[1]), abs(r[2])))


def cmd_sensitivity(args: argparse.Namespace) -> int:
    shape, prof, run, _ = resolve(args.overrides)
    print(f"{shape.name} on {prof.name} x {run.replicas}: tokens/s change when one input is halved / doubled")
    for name, lo, hi in sensitivity(shape, prof, run):
        print(f"  {name:<30} x0.5: {100 * lo:+6.1f}%   x2: {100 * hi:+6.1f}%")
    return 0


def cmd_published(args: argparse.Namespace) -> int:
    from crystal.streaming.sim.published import table

    print(f"{'run':<18} {'device':<6} {'batch x seq':>12} {'published':>10} {'predicted':>10} {'ratio':>6}  samples/s")
    for r in table():
        row = r["row"]
        mark = "  (calibration row)" if row.calibrate else ""
        print(
            f"{row.key:<18} {row.device:<6} {f'{row.batch} x {row.seq}':>12} {r['published']:>10.2f} "
            f"{r['predicted']:>10.2f} {r['ratio']:>6.2f}{mark}"
        )
    return 0


def cmd_gpu(args: argparse.Namespace) -> int:
    from crystal.streaming.sim.gpu import compare, table

    shape, prof, _, extra = resolve(args.overrides, default_cluster="h100", extra_keys=("sizes", "global_batch"))
    sizes = [int(x) for x in str(extra.get("sizes", "16,64")).split(",")]
    rows = compare(shape, prof, sizes, int(extra.get("global_batch", 2112)))
    print(table(rows))
    from crystal.streaming.sim.gpu import recommend

    print(f"\nrecommended crystal backend for {shape.name} on {prof.name} (predictions):")
    for r in recommend(rows, shape, prof):
        print(f"  {r.gpus:>4} GPUs: backend={r.backend:<9} {r.why}")
    if prof.name == "h100":
        from crystal.streaming.sim.gpu import h100_checks

        print("\nchecks against DESIGN.md's measured H100 runs (8-layer, 1.88B params, 8 x 2048 tokens/step):")
        for what, measured, predicted in h100_checks(prof):
            print(
                f"  {what:<38} measured {measured:>7,.0f} tok/s  predicted {predicted:>7,.0f}  "
                f"ratio {predicted / measured:.2f}"
            )
    if args.csv:
        from crystal.streaming.sim.gpu import write_csv

        print(f"wrote {write_csv(rows, args.csv)}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from crystal.streaming.sim.cluster import compare, table

    shape, prof, _, extra = resolve(args.overrides, default_cluster="h100", extra_keys=("sizes",))
    rows = compare(shape, prof, [int(x) for x in str(extra.get("sizes", "8,64")).split(",")])
    print(table(rows, markdown=args.markdown))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("calibrate", "sweep", "gpu", "sensitivity", "cluster", "published")
    command = argv.pop(0) if argv and argv[0] in commands else "predict"
    ap = argparse.ArgumentParser(prog=f"python -m crystal.streaming.sim{'' if command == 'predict' else ' ' + command}")
    ap.add_argument("overrides", nargs="*", help="key=value: model=, cluster=, batch=, seq=, micro_batches=, "
                    "schedule=, prefetch=, recompute=, stream_dtype=, grad_dtype=, replicas= (num_cs2=), "
                    "micro_batch_size=auto|none|<n>, "
                    "model.<key>=, cluster.<section>.<key>=")  # fmt: skip
    if command == "predict":
        ap.add_argument("--trace", type=Path, help="write a Chrome/Perfetto trace of one step")
        ap.add_argument("--plot", type=Path, help="write a PNG timeline of one step")
        fn = cmd_predict
    elif command == "calibrate":
        ap.add_argument("--out", type=Path, default=Path("conf/cluster/cpu.yaml"))
        ap.add_argument("--budget-s", type=float, default=20.0, help="total measuring time (default 20)")
        ap.add_argument("--threads", type=int, default=0, help="torch threads while measuring (0 = torch's default)")
        fn = cmd_calibrate
    elif command == "sensitivity":
        fn = cmd_sensitivity
    elif command == "published":
        fn = cmd_published
    elif command == "cluster":
        ap.add_argument("--markdown", action="store_true", help="print the table as Markdown (docs/cluster.md)")
        fn = cmd_cluster
    elif command == "sweep":
        ap.add_argument("--out-dir", type=Path, default=Path("bench/results"))
        fn = cmd_sweep
    else:
        ap.add_argument("--csv", type=Path, help="write the table as CSV too")
        fn = cmd_gpu
    args = ap.parse_args(argv)
    try:
        return fn(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
