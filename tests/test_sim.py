"""The weight-streaming simulator: event engine, step model, profiles, calibration, CLI, traces.

Hand-computed cases use synthetic profiles whose rates make every task's duration a round number.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from crystal.streaming.sim.cli import main
from crystal.streaming.sim.engine import Engine
from crystal.streaming.sim.profile import available_clusters, load_profile, profile_from_dict
from crystal.streaming.sim.shapes import ModelShape, load_shape
from crystal.streaming.sim.timing import compute_costs, simulate
from crystal.streaming.sim.trace import to_chrome_trace, write_chrome_trace

SHAPE = ModelShape("toy", n_layer=4, d_model=256, n_head=2, ffn_hidden=682, vocab_size=512, max_seq_len=128)


def profile(**sections) -> dict:
    """A GPU-like profile with round numbers; sections override keys: profile(link={"h2d_gbps": 1})."""
    base = {
        "name": "toy",
        "device": {"name": "toy", "peak_tflops": 1.0, "matmul_tflops": [[1.0, 1.0]], "attention_fwd_tflops": 1.0,
                   "attention_bwd_tflops": 1.0, "memory_gbps": 1000.0, "memory_gb": 80.0},
        "link": {"h2d_gbps": 10.0, "d2h_gbps": 10.0, "duplex_gbps": 20.0},
        "host": {"memory_gb": 100.0, "optimizer_mparams_per_s": 1000.0},
        "network": {"devices": 8, "devices_per_node": 8, "intra_node_gbps": 100.0},
        "run": {"batch": 2, "micro_batches": 1},
    }  # fmt: skip
    for section, values in sections.items():
        base[section] = {**base[section], **values}
    return base


def toy(**sections):
    return profile_from_dict(profile(**sections), "toy.yaml")


# ------------------------------------------------------------------------------------------------
# engine: hand-computed timelines


def test_engine_perfect_overlap_and_no_overlap():
    # three copies of 1 s feeding three computes of 2 s: overlapped, the copies hide behind compute
    for serial, expected in ((False, 1 + 3 * 2), (True, 3 * 1 + 3 * 2)):
        eng = Engine(serial=serial)
        for i in range(3):
            c = eng.add("h2d", f"w{i}", 1.0)
            eng.add("compute", f"F{i}", 2.0, [c])
        assert max(t.end_s for t in eng.run()) == pytest.approx(expected)


def test_engine_bandwidth_bound_and_shared_link():
    eng = Engine()
    for i in range(4):
        c = eng.add("h2d", f"w{i}", 3.0)
        eng.add("compute", f"F{i}", 1.0, [c])
    assert max(t.end_s for t in eng.run()) == pytest.approx(4 * 3 + 1)  # copies back to back, one compute tail
    # two 1 s copies in opposite directions on a link whose both-ways rate is 0.5 of the sum: 2 s each
    eng = Engine(shared=("h2d", "d2h", 0.5))
    eng.add("h2d", "w", 1.0)
    eng.add("d2h", "g", 1.0)
    assert [t.end_s for t in eng.run()] == pytest.approx([2.0, 2.0])


def test_engine_deadlock_is_reported():
    eng = Engine()
    eng.add("compute", "a", 1.0, [1])  # depends on a later task of another lane that waits for it
    eng.add("h2d", "b", 1.0, [0])
    with pytest.raises(RuntimeError, match="deadlock"):
        eng.run()


# ------------------------------------------------------------------------------------------------
# the step model


def test_shapes_match_crystalcoder():
    s = load_shape("crystalcoder_7b")
    assert s.params == 6_575_278_720 and s.block_params == 201_377_108
    assert s.flops_per_token(2048) / 1e9 == pytest.approx(42.7, abs=0.05)  # DESIGN.md: 39.5 + 3.2


def test_compute_bound_step_is_the_sum_of_compute():
    prof = toy(link={"h2d_gbps": 1e6, "d2h_gbps": 1e6, "duplex_gbps": 2e6}, host={"optimizer_mparams_per_s": 1e9})
    p = simulate(SHAPE, prof)
    c = p.costs
    compute = c.embed_fwd + SHAPE.n_layer * (2 * c.block_fwd + c.block_bwd) + c.head + c.embed_bwd
    assert p.busy_s["compute"] == pytest.approx(compute)
    assert p.step_s == pytest.approx(compute, rel=1e-3) and p.bottleneck == "compute"
    # FLOPs by hand: one block forward is 2 T P_linear matmul FLOPs + 2 B S^2 d attention at 1 TFLOP/s
    t = 2 * 128
    lin = sum(i * o for _, i, o in SHAPE.block_linears())
    elem = t * (21 * 256 + 5 * 682) * 2 / 1e12
    assert c.block_fwd == pytest.approx((2 * t * lin + 2 * 2 * 128 * 128 * 256) / 1e12 + elem)


def test_bandwidth_bound_step_is_the_weight_traffic():
    prof = toy(device={"matmul_tflops": [[1.0, 1e6]], "attention_fwd_tflops": 1e6, "attention_bwd_tflops": 1e6,
                       "memory_gbps": 1e9}, host={"optimizer_mparams_per_s": 1e9})  # fmt: skip
    p = simulate(SHAPE, prof)
    # every block streamed twice per micro-batch (forward, backward) in bf16, less the two blocks still in
    # the device's buffers at each turn (L-1 and L-2 forward -> backward, 1 and 0 backward -> the next
    # micro-batch's forward), plus the embedding once, at 10 GB/s (the executor counts the same loads)
    L, M = SHAPE.n_layer, prof.run.micro_batches
    loads = (2 * L - 2) + (M - 1) * (2 * L - 4)
    h2d = (loads * SHAPE.block_params + SHAPE.nonblock_params) * 2 / 10e9
    assert p.bottleneck == "h2d" and p.busy_s["h2d"] == pytest.approx(h2d)
    # with compute free, the forward is its L copies in, and the backward is its gradients going out
    # (the backward's copies in run beside them); the update needs every gradient, so nothing of the next
    # step overlaps this one's last copies out
    c = p.costs
    forward, backward = c.nonblock_h2d + L * c.block_h2d, L * c.block_d2h + c.nonblock_d2h
    assert p.step_s == pytest.approx(forward + backward, rel=1e-3)


def test_no_overlap_on_cpu_is_the_sum_of_every_task():
    prof = toy(link={"overlap": False}, host={"overlap": False, "accumulate_gbps": 5.0})
    p = simulate(SHAPE, prof)
    assert p.step_s == pytest.approx(sum(e["dur_s"] for e in p.events))
    assert {e["lane"] for e in p.events} == {"compute", "h2d", "d2h", "optimizer"}
    # ... and prefetch changes nothing when nothing can overlap
    assert simulate(SHAPE, prof, replace(prof.run, prefetch=0)).step_s == pytest.approx(p.step_s)


def test_prefetch_1_beats_prefetch_0_when_copies_match_compute():
    prof = toy()
    c = compute_costs(SHAPE, prof, prof.run)
    h2d = 10.0 * c.block_h2d / c.block_fwd
    prof = toy(link={"h2d_gbps": h2d, "d2h_gbps": 10.0, "duplex_gbps": h2d + 10.0})
    c = compute_costs(SHAPE, prof, prof.run)
    assert c.block_h2d == pytest.approx(c.block_fwd)  # copies comparable to compute
    serial = simulate(SHAPE, prof, replace(prof.run, prefetch=0)).step_s
    double = simulate(SHAPE, prof, replace(prof.run, prefetch=1)).step_s
    assert double < 0.9 * serial  # 4 blocks: the step-boundary copies (embedding, block 0) stay exposed
    # on the real H100 profile too (7B, 8 x 2048 tokens): double buffering hides the copies
    h100, cc = load_profile("h100"), load_shape("crystalcoder_7b")
    steps = [simulate(cc, h100, replace(h100.run, prefetch=k)).step_s for k in (0, 1)]
    assert steps[1] < steps[0]


def test_staging_buffers_let_gradient_copies_run_ahead_of_the_host_accumulate():
    """Each D2H copy waits until the host has summed the gradient N copies before it (the executor's
    backend.streaming.staging_buffers): with one buffer, copy and host sum alternate; with more they overlap."""
    fast = {"matmul_tflops": [[1.0, 1000.0]], "attention_fwd_tflops": 1000.0, "attention_bwd_tflops": 1000.0}
    prof = toy(device=fast, host={"accumulate_gbps": 20.0})  # the host sum of a block as long as its D2H copy
    c = compute_costs(SHAPE, prof, prof.run)
    assert c.block_accum == pytest.approx(c.block_d2h) and c.block_bwd < c.block_d2h / 4
    steps = {n: simulate(SHAPE, prof, replace(prof.run, staging_buffers=n)).step_s for n in (1, 2, 4)}
    assert steps[1] > steps[2] >= steps[4]
    with pytest.raises(ValueError, match="staging_buffers=0 must be >= 1"):
        toy(run={"staging_buffers": 0})


def test_schedules_micro_batches_and_replicas_change_the_answer():
    prof = toy(link={"h2d_gbps": 1.0, "d2h_gbps": 1.0, "duplex_gbps": 2.0})
    bm = simulate(SHAPE, prof, replace(prof.run, micro_batches=4, schedule="batch_major"))
    lm = simulate(SHAPE, prof, replace(prof.run, micro_batches=4, schedule="layer_major"))
    # batch-major copies (2L-2) + (M-1)(2L-4) blocks, layer-major 2L-2 (the executor counts the same)
    L, M, c = SHAPE.n_layer, 4, bm.costs
    assert bm.busy_s["h2d"] == pytest.approx(((2 * L - 2) + (M - 1) * (2 * L - 4)) * c.block_h2d + c.nonblock_h2d)
    assert lm.busy_s["h2d"] == pytest.approx((2 * L - 2) * c.block_h2d + c.nonblock_h2d)
    assert lm.step_s < bm.step_s
    assert lm.memory["device: block inputs kept"] == 4 * bm.memory["device: block inputs kept"]
    one = simulate(SHAPE, prof, replace(prof.run, replicas=1))
    four = simulate(SHAPE, prof, replace(prof.run, replicas=4))
    assert "reduce" in four.busy_s and four.tokens_per_step == 4 * one.tokens_per_step


def test_model_that_does_not_fit_is_reported():
    h100 = load_profile("h100")
    p = simulate(load_shape("crystal_70b"), h100)
    assert not p.fits and "host needs" in p.fit_note  # 70B x 16 bytes of fp32 + Adam > 128 GB
    with pytest.raises(ValueError, match="does not fit on cluster h100: host needs"):
        simulate(load_shape("crystal_70b"), h100, strict=True)
    resident = simulate(load_shape("crystalcoder_7b"), h100, replace(h100.run, schedule="resident"))
    assert not resident.fits and "device needs" in resident.fit_note


# ------------------------------------------------------------------------------------------------
# profiles


@pytest.mark.parametrize("name", available_clusters())
def test_every_shipped_profile_loads_and_simulates(name):
    prof = load_profile(name)
    assert prof.name == name and prof.device.peak_tflops > 0
    p = simulate(load_shape("tiny"), prof, replace(prof.run, batch=1, micro_batches=1, replicas=1))
    assert p.step_s > 0 and p.fits


def test_shipped_figures_cite_a_source():
    from crystal.streaming.sim.profile import CLUSTER_DIR

    for path in CLUSTER_DIR.glob("*.yaml"):
        lines = path.read_text().splitlines()
        for prev, line in zip([""] + lines, lines):
            key = line.split(":")[0].strip()
            if key.endswith(("_gbps", "_tflops", "memory_gb", "_per_s")) and not line.lstrip().startswith("#"):
                cited = "#" in line or prev.lstrip().startswith("#")  # on the line or the one above
                assert cited, f"{path.name}: figure without a source comment: {line}"


@pytest.mark.parametrize(
    ("section", "key", "value", "match"),
    [
        ("link", "h2d_gbps", -5.0, r"toy.yaml: link.h2d_gbps=-5.0 must be > 0"),
        ("device", "peak_tflops", 0.0, r"device.peak_tflops=0.0 must be > 0"),
        ("device", "matmul_tflops", [[2.0, 1.0], [1.0, 1.0]], r"sorted by GFLOP"),
        ("host", "optimizer_mparams_per_s", "fast", r"host.optimizer_mparams_per_s='fast' must be a number"),
        ("link", "h2d_gbs", 1.0, r"unknown key link.h2d_gbs"),
        ("run", "prefetch", 2, r"prefetch=2: use 0 .* or 1"),
        ("run", "schedule", "zigzag", r"schedule='zigzag'"),
        ("network", "topology", "mesh", r"network.topology='mesh'"),
    ],
)
def test_invalid_profiles_fail_with_one_line(section, key, value, match):
    with pytest.raises(ValueError, match=match) as err:
        toy(**{section: {key: value}})
    assert "\n" not in str(err.value)


def test_missing_profile_and_override_typos():
    with pytest.raises(ValueError, match="cluster=nope: .*known clusters: .*cg1"):
        load_profile("nope")
    with pytest.raises(ValueError, match="unknown key link.h2d"):
        load_profile("h100", {"link.h2d": 10})
    with pytest.raises(ValueError, match="model=nope: .*known models"):
        load_shape("nope")


# ------------------------------------------------------------------------------------------------
# calibration, CLI, traces


def test_calibration_writes_a_well_formed_profile(tmp_path):
    from crystal.streaming.sim.calibrate import calibrate

    path = calibrate(tmp_path / "cpu.yaml", budget_s=0.3)
    text = path.read_text()
    assert "measured 20" in text and "on host" in text  # date and host in the comments
    prof = load_profile(path)
    assert prof.device.shares_host_memory and not prof.link.overlap and prof.host.optimizer_mparams_per_s > 0
    assert simulate(load_shape("tiny"), prof).step_s > 0


def test_cli_table_trace_and_plot(tmp_path, capsys):
    trace, png = tmp_path / "t.json", tmp_path / "t.png"
    rc = main(["model=tiny", "cluster=h100", "micro_batches=2", "schedule=layer_major", "--trace", str(trace),
               "--plot", str(png)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "tokens/s" in out and "bottleneck" in out and "fits" in out
    data = json.loads(trace.read_text())
    names = {e["args"]["name"] for e in data["traceEvents"] if e.get("name") == "thread_name"}
    assert names == {"compute", "h2d", "d2h", "optimizer"}
    assert png.stat().st_size > 1000


def test_cli_typo_is_one_clear_line(capsys):
    assert main(["model=tiny", "micro_batch=2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown key 'micro_batch'") and "micro_batches" in err and "\n" not in err
    assert main(["model=tiny", "num_cs2=100"]) == 1
    assert "exceeds the 64 devices" in capsys.readouterr().err


def test_chrome_trace_contract(tmp_path):
    events = [{"lane": "compute", "name": "F0", "start_s": 0.5, "dur_s": 0.25, "block": 0, "step": 1},
              {"lane": "h2d", "name": "w1", "start_s": 0.5, "dur_s": 0.1, "block": 1, "step": 1}]  # fmt: skip
    trace = to_chrome_trace(events)
    x = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert x[0]["ts"] == 500000 and x[0]["dur"] == 250000 and x[0]["tid"] != x[1]["tid"]
    assert json.loads(write_chrome_trace(events, tmp_path / "x.json").read_text()) == trace


def test_gpu_alternatives_and_the_measured_h100_points():
    from crystal.streaming.sim.gpu import HYBRID, compare, h100_checks

    h100 = load_profile("h100")
    rows = {r.strategy: r for r in compare(load_shape("crystalcoder_7b"), h100, [16])}
    assert {"FSDP (ZeRO-3)", "FSDP + CPU offload", HYBRID, "weight streaming"} <= set(rows)
    assert all(r.fits and 0 < r.mfu < 1 for r in rows.values())
    checks = {what: pred / meas for what, meas, pred in h100_checks(h100)}
    assert 0.9 < checks["resident"] < 1.1  # the compute model against DESIGN.md's measured 45.0k tok/s


def test_auto_micro_batching_splits_what_does_not_fit_and_refuses_one_sequence_that_does_not():
    # issue 17: a CS-2 step batch that does not fit whole is cut into micro-batches, as the Cerebras stack does
    shape, prof = load_shape("amber_7b"), load_profile("cs2")
    whole = replace(prof.run, batch=99, micro_batches=1)
    assert not simulate(shape, prof, replace(whole, micro_batch_size="none")).fits
    p = simulate(shape, prof, whole)  # cs2.yaml: micro_batch_size auto
    assert p.fits and (p.run.batch, p.run.micro_batches) == (33, 3) and p.tokens_per_step == 99 * 2048
    assert "split into 3 micro-batches of 33" in p.micro_note and "56.6 GB" in p.micro_note
    assert (simulate(shape, prof, replace(whole, micro_batch_size="11")).run.batch, 11)[0] == 11
    with pytest.raises(ValueError, match="does not divide"):
        simulate(shape, prof, replace(whole, micro_batch_size="10"))
    long = simulate(shape, prof, replace(whole, batch=1, seq=131072))  # one sequence alone is too big
    assert not long.fits and long.fit_note.startswith("one sequence alone: device needs")
    with pytest.raises(ValueError, match="does not fit"):
        simulate(shape, prof, replace(whole, batch=1, seq=131072), strict=True)
