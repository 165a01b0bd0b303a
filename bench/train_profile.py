"""Where a training step's time goes, on both sides of `bench/train.py`: our jitted step (XLA:CPU) and
transformers' LongcatFlashForCausalLM step (PyTorch), the same model, batch and optimizer.

  ours       `jax.profiler.trace` over --steps runs of the compiled step (`bench/train.py`'s `make_jax_step`);
             every XLA op event (a thunk named after its HLO instruction) is matched to the instruction in the
             compiled HLO, its Python frame (the innermost in longcat_jax or optax) and its opcode, and summed
             per part of the model and kind of op. An unfused dot runs asynchronously and its event ends at
             launch: it is timed to the start of the first op that reads it (`async_dot_ends`).
  reference  `torch.profiler` over the same number of steps; self CPU time per aten op, summed per kind of op
             (matmuls, copies and layout changes, indexing and scatter, elementwise, the optimizer's foreach
             kernels, ...).

Both sides report the sum of their ops' times per step beside the measured step time: XLA:CPU may run
independent thunks at once, and torch's intra-op threads are not in its self times, so neither sum is the
wall time; the shares are what to read. Writes JSON (default bench/results/train_profile_cpu.json) and prints
two tables per side.

  floor      (ours, unless --no-floor) what our step's matmuls and optimizer update cost when each runs
             alone, as XLA:CPU runs them: every dot of the compiled HLO (a `dot` instruction, or a dot in a
             fusion's computation) is jitted alone as `lax.dot_general` on random row-major operands of its
             shapes (layouts are not reproduced), timed best-of-N (warm), and counted as many times as its
             instruction ran per step (its thunk's events in the trace: a loop body's op appears once per
             iteration); plus the AdamW update (tx.update + apply_updates) jitted alone, best of 5. It is a
             lower bound only in the sense that each op gets the whole machine and warm caches; everything
             else the step does (elementwise work, copies, sorts, scatters, loop-carried overheads) is not in
             it. Beside it: the step times the targets ask for (1.3x the reference's tokens/s; 70% of the
             matmul rate on the analytic model FLOPs), under "targets" in the JSON.

Usage:
  python bench/train_profile.py [--steps N] [--batch-size B] [--seq-len T] [--json PATH] [--no-floor]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import glob
import gzip
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "train_profile_cpu.json")


def _bench_train():
    """bench/train.py as a module (its name would clash with the repository's train.py)."""
    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(HERE, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- Our side: trace events -> HLO instructions -> Python frames -----------------------------------------

# Parts of the model, by the files on an op's Python stack (innermost first); the first rule that holds wins.
PARTS = (
    ("optimizer update", lambda stems, fns: "optax" in stems or "optim" in stems),
    ("LM head + loss", lambda stems, fns: "lm_loss" in stems or set(stems) == {"bench_loss"}),
    # A custom VJP's forward and backward carry their caller's frames (grouped_swiglu's, for the tiles).
    ("MoE experts (SwiGLU tiles)", lambda stems, fns: "expert_tiles" in stems or "grouped_swiglu" in fns),
    ("MoE routing, dispatch, combine", lambda stems, fns: "moe" in stems),
    ("attention (MLA)", lambda stems, fns: "mla" in stems or "masks" in stems),
    ("norms, RoPE, dense MLP, embedding", lambda stems, fns: "layers" in stems),
    ("layer scan, block glue", lambda stems, fns: bool(stems)),
)


def op_kind(opcode: str, name: str, fused: str) -> str:
    """Kind of an XLA op: matmul (a dot, or a fusion holding one), data movement, or elementwise work."""
    if opcode == "dot" or "dot(" in fused or "ynn" in name:
        return "matmul"
    if opcode in ("copy", "transpose") or (opcode == "fusion" and re.search(r"\b(copy|transpose)\(", fused)
                                          and not re.search(r"\b(add|multiply|exponential)\(", fused)):
        return "copy / transpose"
    if opcode in ("dynamic-slice", "dynamic-update-slice") or "dynamic-update-slice(" in fused \
            or "dynamic-slice(" in fused:
        return "dynamic slice / update (scan)"
    for kind in ("sort", "scatter", "gather", "reduce", "while", "conditional", "all-reduce"):
        if opcode == kind or f" {kind}(" in fused:
            return kind
    return "elementwise fusion" if opcode == "fusion" else opcode


COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*?\{\n(.*?)\n\}", re.M | re.S)  # name, body


def parse_hlo(text: str) -> dict[str, dict]:
    """Instruction name -> opcode, the text of the computation it calls (for fusions), and its Python frame
    (file stem, function) in our code or optax."""
    files = dict(re.findall(r"^(\d+) \"(.*)\"$", text.split("FunctionNames")[0], re.M))
    section = text.split("FunctionNames")[1].split("FileLocations")[0] if "FunctionNames" in text else ""
    functions = dict(re.findall(r"^(\d+) \"(.*)\"$", section, re.M))
    locations = {i: (f, fn) for i, f, fn in re.findall(
        r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+)", text, re.M)}
    frames = {i: (loc, parent) for i, loc, parent in re.findall(
        r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}", text, re.M)}
    computations = dict(COMPUTATION.findall(text))

    def frame_of(frame_id: str) -> tuple[tuple[str, str], ...]:
        """The op's Python frames in our code or optax, innermost first, as (file stem, function)."""
        chain, seen = [], set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            loc, parent = frames[frame_id]
            f, fn = locations[loc]
            path = files.get(f, "")
            if "longcat_jax" in path or "optax" in path:
                stem = "optax" if "optax" in path else os.path.splitext(os.path.basename(path))[0]
                chain.append((stem, functions.get(fn, "")))
            elif path.endswith(os.path.join("bench", "train.py")):
                # The bench's loss function; a custom VJP's backward (the fused LM head's) is traced with
                # its caller's stack, so its ops carry this frame and no deeper one.
                chain.append(("bench_loss", functions.get(fn, "")))
            frame_id = parent
        return tuple(chain)

    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\((.*)$", text, re.M):
        name, opcode, rest = m.groups()
        called = re.search(r"calls=%([\w.\-]+)", rest)
        fused = computations.get(called.group(1), "") if called else ""
        # A fusion made by an XLA pass may carry no metadata of its own; its fused ops still do.
        frame = re.search(r"stack_frame_id=(\d+)", rest) or re.search(r"stack_frame_id=(\d+)", fused)
        op_name = re.search(r'op_name="([^"]*)"', rest) or re.search(r'op_name="([^"]*)"', fused)
        out[name] = dict(opcode=opcode, fused=fused, frame=frame_of(frame.group(1)) if frame else (),
                         op_name=op_name.group(1) if op_name else "",
                         operands=re.findall(r"%([\w.\-]+)", rest.split(")")[0]))
    return out


def part_of(chain: tuple[tuple[str, str], ...]) -> str:
    stems, functions = [stem for stem, _ in chain], [fn for _, fn in chain]
    for part, test in PARTS:
        if test(stems, functions):
            return part
    return "unattributed (no Python frame)"


def profile_ours(bt, cfg, inputs, targets, steps: int, floor: bool) -> dict:
    """The profile of our step and, with `floor`, its floor (`our_floor`), under key "floor"."""
    run, compile_s, _, state = bt.make_jax_step(cfg, inputs, targets)
    hlo = parse_hlo(state["hlo"])
    for _ in range(2):
        run()
    trace_dir = tempfile.mkdtemp(prefix="train_profile_")
    times = []
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
    ends = async_dot_ends(events, hlo)
    by_part, by_kind, unattributed = collections.Counter(), collections.Counter(), collections.Counter()
    by_phase, events_of, seconds_of = collections.Counter(), collections.Counter(), collections.Counter()
    for i, e in enumerate(events):
        info = hlo.get(e["name"])
        if info is None:
            continue
        seconds = (ends.get(i, e["ts"] + e["dur"]) - e["ts"]) / 1e6 / steps
        events_of[e["name"]] += 1
        seconds_of[e["name"]] += seconds
        if info["opcode"] in ("while", "conditional", "call"):
            continue  # a loop's time is its body's ops, counted on their own
        by_part[part_of(info["frame"])] += seconds
        by_kind[op_kind(info["opcode"], e["name"], info["fused"])] += seconds
        if not info["frame"]:
            unattributed[f"{e['name']} ({info['opcode']})"] += seconds
        by_phase[_our_phase(info)] += seconds
    out = dict(step_s=statistics.median(times), ops_s=sum(by_part.values()), compile_s=compile_s,
               by_part=dict(by_part.most_common()), by_kind=dict(by_kind.most_common()),
               by_phase=dict(by_phase.most_common()), unattributed_top=dict(unattributed.most_common(15)))
    if floor:
        per_op = {name: (n / steps, seconds_of[name]) for name, n in events_of.items()}
        out["floor"] = our_floor(bt, state["hlo"], hlo, per_op, state["params"])
    return out


def async_dot_ends(events: list[dict], hlo: dict) -> dict[int, float]:
    """Event index -> end time (us) for the events of unfused dots. XLA:CPU runs such a dot (Eigen's) on its
    intra-op pool and the thunk's trace event ends when the dot is launched, not done; its `end: NAME` event
    comes after the successors it runs inline. A dot is done by the time the first op that reads it starts,
    so that start is taken as its end (the next such start after the event: a loop body's ops run once per
    iteration); with no reader found, the event's own end stays."""
    readers = collections.defaultdict(list)  # instruction -> the instructions that read it
    for name, info in hlo.items():
        for operand in info["operands"]:
            readers[operand].append(name)
    starts = collections.defaultdict(list)  # instruction -> its events' start times, in order
    for e in events:
        if e["name"] in hlo:
            starts[e["name"]].append(e["ts"])
    for times in starts.values():
        times.sort()
    ends = {}
    for i, e in enumerate(events):
        if hlo.get(e["name"], {}).get("opcode") != "dot":
            continue
        later = [ts[k] for r in readers[e["name"]] if (ts := starts.get(r))
                 and (k := bisect.bisect_left(ts, e["ts"] + e["dur"])) < len(ts)]
        if later:
            ends[i] = max(e["ts"] + e["dur"], min(later))
    return ends


def _our_phase(info: dict) -> str:
    """jax names the backward's ops transpose(jvp(...)) in their op_name; optax's ops are the update."""
    if any(stem in ("optax", "optim") for stem, _ in info["frame"]):
        return "optimizer update"
    if "transpose(" in info["op_name"]:
        return "backward"
    return "forward + loss" if info["op_name"] else "unattributed (no op_name)"


# --- Our floor: the step's dots and its optimizer update, each timed alone ---------------------------------

HLO_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "s32": "int32", "s8": "int8"}
DOT = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)$",
                 re.M)  # name, output dtype and dims, lhs, rhs, attributes


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def _dot_dims(attrs: str, key: str) -> tuple[int, ...]:
    """A dot's dimension list (lhs_contracting_dims, rhs_batch_dims, ...); an absent one is empty."""
    m = re.search(rf"\b{key}=\{{([\d,]*)\}}", attrs)
    return _ints(m.group(1)) if m else ()


def hlo_dots(text: str) -> list[dict]:
    """Every dot of the compiled module: `name`; `instruction`, the thunk the profiler names it by (the
    fusion that calls its computation, or the dot itself when not fused); `flops`; and `sig`, what it takes
    to run it alone: (lhs dtype, lhs shape, rhs dtype, rhs shape, ((lhs, rhs) contracting, (lhs, rhs) batch)
    dims, operand precision, output dtype). Operand shapes come from their defining lines in the same
    computation (a fused computation's parameter, a bitcast, another op's result); layouts are dropped."""
    fusion_of = {called: name for name, called in re.findall(
        r"^\s*(?:ROOT )?%([\w.\-]+) = .*?calls=%([\w.\-]+)", text, re.M)}
    dots = []
    for computation, body in COMPUTATION.findall(text):
        shapes = {n: (dtype, _ints(dims)) for n, dtype, dims in re.findall(
            r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]", body, re.M)}
        for name, out_dtype, out_dims, lhs, rhs, attrs in DOT.findall(body):
            contracting = (_dot_dims(attrs, "lhs_contracting_dims"), _dot_dims(attrs, "rhs_contracting_dims"))
            batch = (_dot_dims(attrs, "lhs_batch_dims"), _dot_dims(attrs, "rhs_batch_dims"))
            precision = re.search(r"operand_precision=\{(\w+),(\w+)\}", attrs)
            sig = (*shapes[lhs], *shapes[rhs], (contracting, batch),
                   precision.groups() if precision else None, out_dtype)
            flops = 2 * math.prod(_ints(out_dims)) * math.prod(shapes[lhs][1][d] for d in contracting[0])
            dots.append(dict(name=name, instruction=fusion_of.get(computation, name), sig=sig, flops=flops))
    return dots


def time_dot(sig: tuple) -> float:
    """Seconds of one such dot alone, the best of two ways: one dot per call and, for a dot under 1 ms, 16
    on separate input pairs per call divided by 16 (a call's own cost, dispatch and waking the intra-op
    pool, is tens of microseconds, a sizeable share of a small dot; but 16 pairs may lose cache locality,
    and XLA may run them at once, as it may run independent ops of the step)."""
    alone = _dot_call_s(sig, 1)
    return min(alone, _dot_call_s(sig, 16)) if alone < 1e-3 else alone


def _dot_call_s(sig: tuple, pairs: int, budget_s: float = 0.25) -> float:
    """Seconds per dot of a jit of `pairs` lax.dot_generals on random argument arrays (nothing to fold),
    best of ~budget_s worth of calls (3 to 50)."""
    lhs_dtype, lhs_shape, rhs_dtype, rhs_shape, dimension_numbers, precision, out_dtype = sig
    rng = np.random.default_rng(0)

    def random(shape, dtype):
        return jnp.asarray(rng.standard_normal(shape, np.float32), HLO_DTYPES[dtype])

    args = [(random(lhs_shape, lhs_dtype), random(rhs_shape, rhs_dtype)) for _ in range(pairs)]
    f = jax.jit(lambda args: [jax.lax.dot_general(a, b, dimension_numbers, precision,
                                                  preferred_element_type=HLO_DTYPES[out_dtype])
                              for a, b in args])
    jax.block_until_ready(f(args))

    def once():
        t = time.perf_counter()
        jax.block_until_ready(f(args))
        return time.perf_counter() - t

    first = once()
    return min([first] + [once() for _ in range(max(2, min(49, int(budget_s / first))))]) / pairs


def optimizer_update_s(bt, params) -> float:
    """Seconds of the step's optimizer update alone (tx.update + apply_updates on random gradients, params
    and state donated as the step donates them), best of 5."""
    tx = bt.bench_optimizer(params)
    params = jax.tree.map(jnp.copy, params)
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape, np.float32), p.dtype), params)

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    f = jax.jit(update, donate_argnums=(0, 1))
    times = []
    for _ in range(6):  # the first compiles
        t = time.perf_counter()
        params, opt_state = jax.block_until_ready(f(params, opt_state, grads))
        times.append(time.perf_counter() - t)
    return min(times[1:])


def our_floor(bt, hlo_text: str, hlo: dict, per_op: dict, params) -> dict:
    """The floor of our step: each dot's isolated time x the times its instruction ran per step (its thunk's
    events in the trace), plus the optimizer update alone. per_op: instruction -> (events, seconds) a step.
    The in-step times beside it are the dot-holding instructions' traced times (a fusion's whole time, once
    each; an unfused dot's up to its first reader, `async_dot_ends`), inflated where ops ran side by side."""
    dots = hlo_dots(hlo_text)
    runs = {d["name"]: per_op.get(d["instruction"], (0, 0.0))[0] for d in dots}
    isolated = {sig: time_dot(sig) for sig in dict.fromkeys(d["sig"] for d in dots)}
    by_part, in_step_by_part, sigs = collections.Counter(), collections.Counter(), {}
    for d in dots:
        by_part[part_of(hlo[d["instruction"]]["frame"])] += runs[d["name"]] * isolated[d["sig"]]
        row = sigs.setdefault(d["sig"], dict(count=0, flops=d["flops"], instructions=set()))
        row["count"] += runs[d["name"]]
        row["instructions"].add(d["instruction"])
    for instruction in {d["instruction"] for d in dots}:
        in_step_by_part[part_of(hlo[instruction]["frame"])] += per_op.get(instruction, (0, 0.0))[1]
    top = []
    for sig, row in sorted(sigs.items(), key=lambda kv: -kv[1]["count"] * isolated[kv[0]])[:15]:
        in_step = sum(per_op.get(i, (0, 0.0))[1] for i in row["instructions"])
        top.append(dict(lhs=f"{sig[0]}{list(sig[1])}", rhs=f"{sig[2]}{list(sig[3])}", dims=str(sig[4]),
                        count_per_step=row["count"], isolated_ms=isolated[sig] * 1e3,
                        gflops_per_s=row["flops"] / isolated[sig] / 1e9,
                        floor_ms=row["count"] * isolated[sig] * 1e3, instructions_in_step_ms=in_step * 1e3))
    matmul_s, optimizer_s = sum(by_part.values()), optimizer_update_s(bt, params)
    return dict(floor_s=matmul_s + optimizer_s, matmul_s=matmul_s, optimizer_s=optimizer_s,
                matmul_by_part=dict(by_part.most_common()), in_step_by_part=dict(in_step_by_part),
                dots=len(dots), dot_instructions=len({d["instruction"] for d in dots}),
                signatures=len(isolated), dots_never_run=sum(n == 0 for n in runs.values()),
                dot_flops_per_step=sum(runs[d["name"]] * d["flops"] for d in dots), top_signatures=top)


# --- Reference side: torch.profiler ------------------------------------------------------------------------

TORCH_KINDS = (
    ("matmul", ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "_scaled_dot_product")),
    ("optimizer (foreach)", ("_foreach", "adamw", "clip_grad", "_fused_adamw")),
    ("copy / layout", ("copy_", "clone", "contiguous", "transpose", "permute", "reshape", "view", "t",
                       "expand", "cat", "stack", "_to_copy", "to", "as_strided")),
    ("index / scatter / sort", ("index", "index_add_", "index_select", "scatter", "gather", "sort", "topk",
                                "argsort", "nonzero", "where", "bincount", "unique", "masked")),
    ("softmax / log_softmax / CE", ("softmax", "_softmax", "log_softmax", "nll_loss", "cross_entropy")),
)


def torch_kind(name: str) -> str:
    op = name.split("::")[-1]
    for kind, names in TORCH_KINDS:
        if any(op == n or op.startswith(n + "_") or op.startswith(n) and n.startswith("_") for n in names):
            return kind
        if any(n in op for n in names if len(n) > 4):
            return kind
    return "elementwise / other"


def profile_reference(bt, cfg, inputs, targets, steps: int, threads: int) -> dict:
    import torch.profiler

    run, info = bt.make_torch_step(cfg, inputs, targets, threads)
    for _ in range(2):
        run()
    times = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    by_kind, by_op, by_phase = collections.Counter(), collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.name in PHASES:
            continue
        seconds = event.self_cpu_time_total / 1e6 / steps
        by_kind[torch_kind(event.name)] += seconds
        by_op[event.name] += seconds
        by_phase[_phase_of(event)] += seconds
    return dict(step_s=statistics.median(times), ops_s=sum(by_kind.values()),
                by_kind=dict(by_kind.most_common()), by_phase=dict(by_phase.most_common()),
                top_ops=dict(by_op.most_common(15)), attn_implementation=info["attn_implementation"])


PHASES = ("forward + loss", "backward", "optimizer update")  # bench/train.py's record_function labels


def _phase_of(event) -> str:
    """The labelled phase an op ran in; autograd's backward ops run outside the label's thread and parent
    chain on some builds, so an op with no labelled ancestor is counted as backward."""
    while event is not None:
        if event.name in PHASES:
            return event.name
        event = event.cpu_parent
    return "backward"


def _table(title: str, rows: dict, step_s: float, ops_s: float):
    print(f"\n{title}: step {step_s * 1e3:.0f} ms (median), ops summed {ops_s * 1e3:.0f} ms")
    for name, s in rows.items():
        print(f"  {name:38s} {s * 1e3:8.1f} ms  {s / ops_s:6.1%}")


def step_targets(bt, cfg, batch: int, seq: int, ours: dict, reference: dict) -> dict:
    """The step times the targets ask for: 1.3x the reference's tokens/s, and 70% of this process's f32
    matmul rate on the analytic model FLOPs (bench/train.py's yardstick: a 2048^3 jnp matmul, best of 3)."""
    time.sleep(0.5)  # let torch's worker threads stop spinning before the matmul rate is timed
    model_flops, rate = bt.analytic_flops(cfg, batch, seq)["flops"], max(bt.matmul_rates(2048, 3))
    out = dict(reference_step_s=reference["step_s"], step_for_1_3x_reference_s=reference["step_s"] / 1.3,
               model_flops=model_flops, matmul_flops_per_s=rate,
               step_for_70pct_matmul_s=model_flops / (0.7 * rate))
    if "floor" in ours:
        out["floor_within_1_3x_step"] = ours["floor"]["floor_s"] <= out["step_for_1_3x_reference_s"]
    return out


def _floor_tables(ours: dict, targets: dict):
    f, ms = ours["floor"], 1e3
    print(f"\nours, floor: {f['dots']} dots in {f['dot_instructions']} instructions, {f['signatures']} "
          f"shapes each timed alone; {f['dot_flops_per_step'] / 1e9:.1f} GFLOP of dots per step "
          f"(analytic model FLOPs {targets['model_flops'] / 1e9:.1f})")
    print(f"  {'matmuls by model part':38s} {'alone':>8s}    {'in step':>8s} (their instructions, traced)")
    for part, s in f["matmul_by_part"].items():
        print(f"  {part:38s} {s * ms:8.1f} ms {f['in_step_by_part'].get(part, 0.0) * ms:8.1f} ms")
    print(f"  {'optimizer update':38s} {f['optimizer_s'] * ms:8.1f} ms "
          f"{ours['by_part'].get('optimizer update', 0.0) * ms:8.1f} ms")
    print(f"\n  {'largest dots: lhs, rhs':40s} {'(contracting), (batch) dims':30s} {'runs':>5s} "
          f"{'alone ms':>9s} {'GFLOP/s':>8s} {'floor ms':>9s} {'in step':>8s}")
    for r in f["top_signatures"]:
        print(f"  {r['lhs'] + ', ' + r['rhs']:40s} {r['dims']:30s} {r['count_per_step']:5.0f} "
              f"{r['isolated_ms']:9.3f} {r['gflops_per_s']:8.1f} {r['floor_ms']:9.1f} "
              f"{r['instructions_in_step_ms']:8.1f}")
    print("\nstep times")
    parts = f"matmuls {f['matmul_s'] * ms:.0f} + update {f['optimizer_s'] * ms:.0f} ms"
    for name, s in (("ours, measured (median)", ours["step_s"]), (f"ours, floor ({parts})", f["floor_s"]),
                    ("reference, measured (median)", targets["reference_step_s"]),
                    ("1.3x the reference's tokens/s", targets["step_for_1_3x_reference_s"]),
                    (f"70% of matmul rate ({targets['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s)",
                     targets["step_for_70pct_matmul_s"])):
        print(f"  {name:52s} {s * ms:8.1f} ms")
    print(f"  floor within the 1.3x step: {targets['floor_within_1_3x_step']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="profiled steps per side (after 2 warm-up steps)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--json", default=DEFAULT_JSON, help="result file ('' to skip)")
    p.add_argument("--no-floor", action="store_true", help="skip our floor (each dot and the update alone)")
    args = p.parse_args(argv)
    bt = _bench_train()
    cfg = bt.bench_config()
    inputs, targets = bt.random_batch(cfg, args.batch_size, args.seq_len)
    # Our floor is timed before the reference runs, so torch's spinning worker threads do not slow it.
    ours = profile_ours(bt, cfg, inputs, targets, args.steps, floor=not args.no_floor)
    reference = profile_reference(bt, cfg, inputs, targets, args.steps, args.threads)
    _table("ours by model part", ours["by_part"], ours["step_s"], ours["ops_s"])
    _table("ours by op kind", ours["by_kind"], ours["step_s"], ours["ops_s"])
    _table("ours by phase", ours["by_phase"], ours["step_s"], ours["ops_s"])
    _table(f"transformers ({reference['attn_implementation']}) by op kind", reference["by_kind"],
           reference["step_s"], reference["ops_s"])
    _table(f"transformers ({reference['attn_implementation']}) by phase", reference["by_phase"],
           reference["step_s"], reference["ops_s"])
    result = dict(machine=bt.machine_info(), settings=dict(batch_size=args.batch_size, seq_len=args.seq_len,
                                                           steps=args.steps, dtype="float32"),
                  ours=ours, reference=reference,
                  targets=step_targets(bt, cfg, args.batch_size, args.seq_len, ours, reference))
    if "floor" in ours:
        _floor_tables(ours, result["targets"])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
