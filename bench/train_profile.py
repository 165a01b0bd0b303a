"""Where a training step's time goes, on both sides of `bench/train.py`: our jitted step (XLA:CPU) and
transformers' LongcatFlashForCausalLM step (PyTorch), the same model, batch and optimizer.

  ours       `jax.profiler.trace` over --steps steps of the compiled step (`bench/train.py`'s
             `make_jax_step`); every XLA op event of the trace (a thunk named after its HLO instruction) is
             matched to the instruction in the compiled HLO, and from there to the Python frame that made it
             (the HLO's stack frames: the innermost frame in longcat_jax or optax) and to its opcode. Time is
             summed per part of the model and per kind of op.
  reference  `torch.profiler` over the same number of steps; self CPU time per aten op, summed per kind of op
             (matmuls, copies and layout changes, indexing and scatter, elementwise, the optimizer's foreach
             kernels, ...).

Both sides report the sum of their ops' times per step beside the measured step time: XLA:CPU may run
independent thunks at once, and torch's intra-op threads are not in its self times, so neither sum is the
wall time; the shares are what to read. Writes JSON (default bench/results/train_profile_cpu.json) and prints
two tables per side.

Usage:
  python bench/train_profile.py [--steps N] [--batch-size B] [--seq-len T] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax

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
    ("optimizer update", lambda stems: "optax" in stems or "optim" in stems),
    ("LM head + loss", lambda stems: "lm_loss" in stems or set(stems) == {"bench_loss"}),
    ("MoE experts (SwiGLU tiles)", lambda stems: "expert_tiles" in stems),
    ("MoE routing, dispatch, combine", lambda stems: "moe" in stems),
    ("attention (MLA)", lambda stems: "mla" in stems or "masks" in stems),
    ("norms, RoPE, dense MLP, embedding", lambda stems: "layers" in stems),
    ("layer scan, block glue", lambda stems: bool(stems)),
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
    computations = dict(re.findall(r"^%([\w.\-]+) \(.*?\{\n(.*?)\n\}", text, re.M | re.S))

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
                         op_name=op_name.group(1) if op_name else "")
    return out


def part_of(chain: tuple[tuple[str, str], ...]) -> str:
    stems = [stem for stem, _ in chain]
    for part, test in PARTS:
        if test(stems):
            return part
    return "unattributed (no Python frame)"


def profile_ours(bt, cfg, inputs, targets, steps: int) -> dict:
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
    by_part, by_kind, unattributed = collections.Counter(), collections.Counter(), collections.Counter()
    by_phase = collections.Counter()
    for e in events:
        info = hlo.get(e["name"])
        if info is None:
            continue
        seconds = e["dur"] / 1e6 / steps
        if info["opcode"] in ("while", "conditional", "call"):
            continue  # a loop's time is its body's ops, counted on their own
        by_part[part_of(info["frame"])] += seconds
        by_kind[op_kind(info["opcode"], e["name"], info["fused"])] += seconds
        if not info["frame"]:
            unattributed[f"{e['name']} ({info['opcode']})"] += seconds
        by_phase[_our_phase(info)] += seconds
    return dict(step_s=statistics.median(times), ops_s=sum(by_part.values()), compile_s=compile_s,
                by_part=dict(by_part.most_common()), by_kind=dict(by_kind.most_common()),
                by_phase=dict(by_phase.most_common()), unattributed_top=dict(unattributed.most_common(15)))


def _our_phase(info: dict) -> str:
    """jax names the backward's ops transpose(jvp(...)) in their op_name; optax's ops are the update."""
    if any(stem in ("optax", "optim") for stem, _ in info["frame"]):
        return "optimizer update"
    if "transpose(" in info["op_name"]:
        return "backward"
    return "forward + loss" if info["op_name"] else "unattributed (no op_name)"


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="profiled steps per side (after 2 warm-up steps)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--json", default=DEFAULT_JSON, help="result file ('' to skip)")
    args = p.parse_args(argv)
    bt = _bench_train()
    cfg = bt.bench_config()
    inputs, targets = bt.random_batch(cfg, args.batch_size, args.seq_len)
    ours = profile_ours(bt, cfg, inputs, targets, args.steps)
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
                  ours=ours, reference=reference)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
