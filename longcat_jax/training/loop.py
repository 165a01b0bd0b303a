"""The training run behind `train.py`: data, model and mesh, optimizer state, the jitted steps, the loop.

`train(args)` takes the parsed command line of `train.py` (`parse_args`); the functions below read top to
bottom in the order a run happens. It writes OUT/metrics.jsonl, OUT/tensorboard/, OUT/events.log,
OUT/checkpoints/, OUT/tokenizer.json, OUT/loss_curve.png, OUT/sample.txt and OUT/summary.json.

`--init-from PATH` starts the run from existing weights (a Hugging Face folder, an Orbax folder of
`longcat_jax.convert` or a train.py run) with a fresh optimizer; `--eval-only` measures the held-out loss of
OUT's newest good checkpoint (or of the --init-from weights) and trains nothing. Both live in `init_weights`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import longcat_jax as lj
from longcat_jax.model import pipeline
from longcat_jax.training import run_settings
from longcat_jax.training.corpus import Data, load_data
from longcat_jax.training.init_weights import (
    evaluate,
    load_init_weights,
    model_config,
    place_weights,
)
from longcat_jax.training.model_flops import step_flops
from longcat_jax.training.optim import (
    OptimizerSettings,
    learning_rate_schedule,
    make_optimizer,
    zero1_state_shardings,
)
from longcat_jax.training.reliability import (
    fingerprint_mismatch,
    flip_bit_on_device,
    init_guard,
    needs_restore,
    odd_replicas,
    replica_fingerprints,
)
from longcat_jax.training.run_checkpoint import RunCheckpointer, StopFlag, install_stop_signals
from longcat_jax.training.run_log import RunLog, phase, plot_loss_curve
from longcat_jax.training.step_measures import (
    Throughput,
    expert_load_stats,
    measured_peak,
    profile_window,
)
from longcat_jax.training.train_step import LossSettings, TrainState, eval_loss, train_step
from sharding import distributed
from sharding.fsdp import fully_sharded
from sharding.mesh import make_mesh
from sharding.rules import RULES

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "names": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out", "moe_out"),
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["attn_out", "mlp_out", "moe_out"],
        offload_src="device", offload_dst="pinned_host"),
}

DETERMINISTIC_XLA_FLAGS = ("--xla_gpu_deterministic_ops=true", "--xla_gpu_exclude_nondeterministic_ops=true")


def with_deterministic_flags(xla_flags: str) -> str:
    """`xla_flags` plus those of DETERMINISTIC_XLA_FLAGS it lacks (each added once)."""
    flags = xla_flags.split()
    return " ".join(flags + [f for f in DETERMINISTIC_XLA_FLAGS if f not in flags])


class TooManyRestores(RuntimeError):
    pass


class DataReadError(ValueError):
    """The data could not be read mid-run; one line for stderr (the run keeps its last checkpoint)."""


@dataclasses.dataclass
class Steps:
    """The compiled programs of a run and what they run on."""

    cfg: lj.Config
    mesh: jax.sharding.Mesh | None
    graphdef: nnx.GraphDef
    step_fn: Callable
    held_out_loss: Callable  # params -> mean held-out loss per token
    to_device: Callable  # host batch -> device batch
    schedule: Callable  # step -> learning rate
    indexer_warmup: int  # steps of dense attention before the sparse stage


COMPILE_CACHE = os.path.expanduser("~/.cache/longcat-jax/xla")


def train(args: argparse.Namespace) -> int:
    """Run training as `args` says. Returns 0 when it reached --steps; 2 on a setting or data error (one line
    on stderr); 128 + the signal number when SIGINT or SIGTERM stopped it (after the current step, saved, or
    before the first step, with nothing saved). Raises TooManyRestores when a failure keeps coming back (see
    `run`)."""
    if args.deterministic:
        # CPU XLA is already deterministic; these make GPU reductions and scatters deterministic too (read
        # when the backend starts). Added once: XLA_FLAGS is part of the compilation-cache key, so appending
        # them again on every in-process call would make each later run recompile everything.
        os.environ["XLA_FLAGS"] = with_deterministic_flags(os.environ.get("XLA_FLAGS", ""))
    if not args.no_compile_cache and jax.config.jax_compilation_cache_dir is None:
        # A rerun of the same command loads its compiled programs instead of compiling them again.
        jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
    os.makedirs(args.out, exist_ok=True)
    if args.eval_only:
        return evaluate(args)
    ckpt = RunCheckpointer(os.path.join(args.out, "checkpoints"), keep=args.keep, save_every=args.save_every,
                           log=lambda s: print(s, file=sys.stderr))
    if ckpt.all_steps() and not args.resume:
        print(f"error: {args.out} already holds checkpoints {ckpt.all_steps()}; pass --resume to continue it "
              "or choose another --out", file=sys.stderr)
        return 2
    problem = run_settings.check_resume(args) if args.resume else None
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    stop = install_stop_signals()  # from here on, Ctrl-C stops the run cleanly at the next chance
    try:
        try:
            corpus = load_data(args)
            # Before the settings are saved: weights that do not fit the run are refused up front.
            init = load_init_weights(args.init_from, model_config(args, corpus), corpus.tokenizer,
                                     args.preset) if args.init_from else None
        except (ValueError, FileNotFoundError) as e:  # the data layer names the file and what is wrong
            print(f"error: {e}", file=sys.stderr)
            return 2
        if stop.requested:
            return _stopped_before_training(stop)
        if distributed.is_primary():
            run_settings.save(args, model_config(args, corpus))
        steps, state = build(args, corpus, ckpt, init)
        log = RunLog(args.out, resume=args.resume, wandb_project=args.wandb,
                     settings=run_settings.current(args), primary=distributed.is_primary())
        if args.resume:
            log.rewind(int(state.step))  # steps logged after the checkpoint resumed from are done again
        try:
            state, step, first_eval, throughput = loop(args, steps, state, corpus, ckpt, log, stop)
        except DataReadError as e:
            log.close()
            print(f"error: {e}", file=sys.stderr)
            return 2
        finish(args, steps, state, step, first_eval, throughput, corpus, log, stop.requested)
        log.close()
    finally:
        stop.uninstall()
        ckpt.close()
    if stop.requested:
        return 128 + signal.Signals[stop.signal_name].value
    return 0


def run(args: argparse.Namespace) -> int:
    """`train` with a non-transient failure (restores exhausted) reported as exit status 3."""
    try:
        return train(args)
    except TooManyRestores as e:
        print(f"error: {e}", file=sys.stderr)
        return 3


def build(args, corpus: Data, ckpt: RunCheckpointer, init: tuple[dict, str] | None = None
          ) -> tuple[Steps, TrainState]:
    """Model and mesh (the weights of `init`, from `load_init_weights`, when given), a fresh optimizer and
    train state (restored with --resume), and the jitted steps."""
    cfg = model_config(args, corpus)
    if init is not None:
        phase(f"initial weights: {init[1]}; a fresh optimizer")
    mesh, graphdef, params = _model(args, cfg, init[0] if init is not None else None)
    to_device = _to_device_fn(mesh)

    resolve = functools.partial(run_settings.resolve_warmup, steps=args.steps)
    warmup = resolve("warmup_steps", args.warmup_steps)
    indexer_warmup = resolve("indexer_warmup_steps", args.indexer_warmup_steps)
    phase(run_settings.describe_schedule(args, warmup, indexer_warmup if cfg.use_indexer else 0))
    stages = pipeline.stages(RULES, mesh)
    if stages > 1:
        phase(run_settings.describe_pipeline(stages, args.microbatches))
    opt_settings = OptimizerSettings(lr=args.lr, warmup_steps=warmup, total_steps=args.steps,
                                     schedule=args.schedule, use_muon=args.optimizer == "muon")
    optimizer = make_optimizer(opt_settings, params)
    with _mesh_context(mesh):
        opt_state = jax.jit(optimizer.init)(params)  # initialised once, then placed
    if mesh is not None:  # ZeRO-1: the state is sharded over dp
        opt_state = jax.device_put(opt_state, zero1_state_shardings(opt_state, mesh))
    host_opt_shardings = None
    if args.offload_optimizer:
        host_opt_shardings = _in_host_memory(jax.tree.map(lambda x: x.sharding, opt_state))
        opt_state = jax.device_put(opt_state, host_opt_shardings)
    # Step and guard replicated over the mesh from the start: a restore gives each leaf the sharding of the
    # live one, and in a multi-process run a value on one device would not be on the other processes'.
    replicated = NamedSharding(mesh, P()) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
    scalars = jax.device_put(jax.device_get((jnp.zeros((), jnp.int32), init_guard())), replicated)
    state = TrainState(params=params, opt_state=opt_state, step=scalars[0], guard=scalars[1])
    if args.resume:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = ckpt.restore_latest(abstract, corpus.train_iter)
        if restored is None:
            print(f"--resume: no checkpoint in {args.out}; starting from step 0", file=sys.stderr)
        else:
            state = _like(restored[1], state)

    settings = LossSettings(mtp_weight=args.mtp_weight, z_loss=args.z_loss,
                            indexer_weight=args.indexer_weight, balance_weight=args.balance_weight,
                            bias_update_rate=args.bias_update_rate, abft=args.abft)
    # Params keep their own layout (the step must not drift them onto dp); the optimizer state is ZeRO-1
    # sharded on a mesh and waits in host memory with --offload-optimizer.
    state_shardings = TrainState(params=jax.tree.map(lambda x: x.sharding, state.params),
                                 opt_state=jax.tree.map(lambda x: x.sharding, state.opt_state),
                                 step=replicated, guard=jax.tree.map(lambda _: replicated, state.guard))
    # Donation needs every leaf in its own buffer (fresh zeros and the opt-state init may share some); a
    # jitted copy writes each output to its own buffer, on its final sharding.
    state = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=state_shardings)(state)
    step_fn = jax.jit(functools.partial(
        train_step, graphdef=graphdef, cfg=cfg, optimizer=optimizer, settings=settings,
        remat=REMAT_POLICIES[args.remat], host_opt_shardings=host_opt_shardings, grad_accum=args.grad_accum,
        microbatches=args.microbatches,
    ), static_argnames=("dense_attention", "measure_recall"), donate_argnums=0,
        out_shardings=(state_shardings, None, None))
    held_out_loss = _held_out_loss_fn(graphdef, corpus, to_device)
    schedule = learning_rate_schedule(opt_settings)
    return Steps(cfg, mesh, graphdef, step_fn, held_out_loss, to_device, schedule, indexer_warmup), state


def _model(args, cfg: lj.Config, weights: dict | None):
    """(mesh, graphdef, params) of the run's model: initialised from --seed, or holding `weights`."""
    mesh = make_mesh(args.mesh_sizes) if args.mesh else None
    graphdef, params = nnx.split(lj.build_model(cfg, seed=args.seed, mesh=mesh))
    if args.fsdp:
        params = fully_sharded(params, mesh)
    if weights is not None:
        place_weights(params, weights)
    return mesh, graphdef, params


def _to_device_fn(mesh):
    batch_sharding = NamedSharding(mesh, P("dp")) if mesh is not None else None

    def place(v):
        if batch_sharding is None:
            return jnp.asarray(v)
        if jax.process_count() == 1:
            return jax.device_put(v, batch_sharding)
        # Every process reads the same batches (same data, same seed); each places the rows of its devices.
        return jax.make_array_from_callback(v.shape, batch_sharding, lambda index: v[index])

    def to_device(batch):
        return {k: place(v) for k, v in batch.items()}

    return to_device


def _held_out_loss_fn(graphdef, corpus: Data, to_device) -> Callable:
    """params -> the mean held-out loss per token over the corpus' eval batches (one compiled program)."""
    eval_fn = jax.jit(functools.partial(eval_loss, graphdef=graphdef))

    def held_out_loss(params):
        losses = [eval_fn(params, batch=to_device(b)) for b in corpus.eval_batches]
        total = sum(float(l) * float(n) for l, n in losses)
        return total / max(sum(float(n) for _, n in losses), 1.0)

    return held_out_loss


def loop(args, steps: Steps, state: TrainState, corpus: Data, ckpt: RunCheckpointer, log: RunLog,
         stop: StopFlag):
    """Train from the state's step to args.steps, with evals, guards, restores, faults and checkpoints.

    Returns (state, step reached, held-out loss at the start, the steady-state Throughput)."""
    cfg, mesh = steps.cfg, steps.mesh
    start_step = int(state.step)
    log.event(start_step, f"{args.preset}: {cfg.num_layers} layers, vocab {cfg.vocab_size}, "
              f"{sum(x.size for x in jax.tree.leaves(state.params)):,} parameters, "
              f"mesh {args.mesh or '1 device'}")
    phase("compiling the eval step (the first held-out loss)")
    t = time.perf_counter()
    with _mesh_context(mesh):
        first_eval = steps.held_out_loss(state.params)
    log.event(start_step, f"held-out loss {first_eval:.3f}; eval step compiled (or loaded) and run in "
              f"{time.perf_counter() - t:.1f} s")
    log.metrics(start_step, {"eval_loss": first_eval})
    if stop.requested:  # during the build or the first held-out loss
        log.event(start_step, f"{stop.signal_name} before the first step: nothing saved, stopping")
        return state, start_step, first_eval, Throughput()
    tokens_per_step = args.batch_size * args.seq_len
    flops = {dense: step_flops(cfg, state.params, args.batch_size, args.seq_len, sparse=not dense)
             for dense in (False, True)}
    # A terminal gets a progress bar; a file or pipe gets a plain line every --log-every steps.
    interactive = sys.stderr.isatty()
    bar = tqdm(total=args.steps, initial=start_step, disable=args.no_progress or not interactive,
               dynamic_ncols=True)
    fault = args.fault
    load_sum = None
    fault_fired = False
    restores_left = [args.max_restores]
    throughput = Throughput(peak=measured_peak(mesh, cfg.jnp_dtype))
    phase(f"matmul rate of the device{'s' if mesh is not None else ''}: {throughput.peak / 1e9:.1f} GFLOP/s "
          f"({cfg.dtype}); MFU is measured against it")
    step = start_step
    with _mesh_context(mesh):
        while step < args.steps:
            profile_window(args, step + 1, start=True)
            try:
                batch = steps.to_device(next(corpus.train_iter))
            except ValueError as e:  # a prepared shard found damaged when it is read
                raise DataReadError(str(e).splitlines()[0]) from e
            # An injected fault is transient, like a real one: it fires once, not again after a restore.
            armed = fault is not None and not fault_fired and step == fault.step
            fault_fired = fault_fired or armed
            nan_at = jnp.int32(step if armed and fault.kind == "nan-grad" else -1)
            flip_at = jnp.int32(step if armed and fault.kind == "bitflip" else -1)
            dense = step < steps.indexer_warmup
            # Held-out loss and expert statistics at the eval steps; there, the sparse stage also measures its
            # selection recall (a dense-attention pass, its own compiled program).
            at_eval = (step + 1) % args.eval_every == 0 or step + 1 == args.steps
            programs, t = steps.step_fn._cache_size(), time.perf_counter()
            state, metrics, load = steps.step_fn(state, batch, nan_fault_step=nan_at, flip_fault_step=flip_at,
                                                 dense_attention=dense, measure_recall=at_eval and not dense)
            metrics = jax.device_get(metrics)
            step_time = time.perf_counter() - t
            step += 1
            if steps.step_fn._cache_size() > programs:  # this step compiled a program: not a steady step
                kind = "dense warm-up" if dense else "sparse, measuring recall" if at_eval else "sparse"
                log.event(step, f"train step ({kind}): program compiled (or loaded from the cache) and "
                          f"run in {step_time:.1f} s")
            else:
                throughput.add(tokens_per_step, step_time, flops[dense])
            metrics.update(lr=float(steps.schedule(step - 1)), step_time=step_time)
            if throughput.seconds:
                metrics.update(tokens_per_sec=throughput.tokens_per_sec, mfu=throughput.mfu)
            load_sum = np.asarray(load) if load_sum is None else load_sum + np.asarray(load)
            if bool(metrics["skipped"]):
                log.event(step, f"skipped update: loss {float(metrics['loss']):.4g}, grad norm "
                          f"{float(metrics['grad_norm']):.4g}, abft mismatch "
                          f"{bool(metrics['abft_mismatch'])}")
            if at_eval:
                metrics["eval_loss"] = steps.held_out_loss(state.params)
                metrics.update(expert_load_stats(load_sum, cfg))
                load_sum = None
            log.metrics(step, metrics)
            profile_window(args, step, start=False)
            bar.update(max(step - bar.n, 0))
            bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", ce=f"{float(metrics['ce']):.3f}",
                            tok_s=f"{throughput.tokens_per_sec:.0f}", mfu=f"{throughput.mfu:.0%}")
            if not (interactive or args.no_progress) and (step % args.log_every == 0 or step == args.steps):
                print(f"step {step}/{args.steps}  loss {float(metrics['loss']):.4f}  "
                      f"ce {float(metrics['ce']):.4f}  lr {metrics['lr']:.2e}  "
                      f"{throughput.tokens_per_sec:.0f} tokens/s  MFU {throughput.mfu:.0%}  "
                      f"{step_time:.2f} s/step", flush=True)
            flipped = armed and fault.kind == "bitflip" and mesh is not None
            if flipped:
                state = _corrupt_one_replica(state, mesh, log, step)
            if mesh is not None and args.mesh_sizes.get("dp", 1) > 1 and (
                    step % args.fingerprint_every == 0 or flipped):
                fps = replica_fingerprints(state.params, mesh)
                if bool(fingerprint_mismatch(fps)):
                    log.event(step, f"parameter fingerprint mismatch across dp replicas {odd_replicas(fps)}: "
                              "restoring the last good checkpoint")
                    state, step = _restore(ckpt, state, corpus.train_iter, log, step, restores_left)
                    continue
            if needs_restore(state.guard, args.max_bad_steps):
                log.event(step, f"{args.max_bad_steps} bad steps in a row: restoring the last good "
                          "checkpoint")
                state, step = _restore(ckpt, state, corpus.train_iter, log, step, restores_left)
                continue
            if stop.requested and step == start_step + 1 and start_step == 0:
                # The signal came while the first step ran (most likely while it compiled): nothing worth
                # keeping, and a checkpoint would make rerunning the same command ask for --resume.
                log.event(step, f"{stop.signal_name} during the first step: nothing saved, stopping")
                break
            ckpt.maybe_save(step, state, corpus.train_iter, force=stop.requested or step == args.steps)
            if stop.requested:
                log.event(step, f"{stop.signal_name}: checkpoint saved, stopping")
                break
    bar.close()
    ckpt.wait()
    return state, step, first_eval, throughput


def finish(args, steps: Steps, state: TrainState, step: int, first_eval: float, throughput: Throughput,
           corpus: Data, log: RunLog, stopped: bool):
    """The loss curve and summary.json; unless a signal stopped the run (it should exit within seconds), the
    closing held-out loss and a sample too (prompted with --prompt, else the start of held-out text)."""
    final_eval = None
    if not stopped:
        with _mesh_context(steps.mesh):
            final_eval = steps.held_out_loss(state.params)
    sample = ""
    if args.sample_tokens and not stopped:
        prompt = args.prompt if args.prompt is not None else corpus.sample_prompt
        model = nnx.merge(steps.graphdef, state.params)
        sample = _sample(model, corpus.tokenizer, prompt, args.sample_tokens)  # every process: SPMD
    if not log.primary:  # one process writes the run's files
        return
    if sample:
        with open(os.path.join(args.out, "sample.txt"), "w") as f:
            f.write(sample)
    curve = plot_loss_curve(args.out)
    stages = pipeline.stages(RULES, steps.mesh)
    summary = {"preset": args.preset, "steps": step, "held_out_loss_start": first_eval,
               "held_out_loss_end": final_eval, "tokens_per_sec": throughput.tokens_per_sec,
               "mfu": throughput.mfu, "matmul_flops_per_sec": throughput.peak,
               "steady_steps": throughput.steps, "steady_seconds": throughput.seconds,
               "pipeline_bubble": pipeline.bubble_fraction(stages, args.microbatches) if stages > 1 else None,
               "init_from": os.path.abspath(args.init_from) if args.init_from else None}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if final_eval is not None:
        log.event(step, f"held-out loss {first_eval:.3f} -> {final_eval:.3f}; curve {curve}")
    if sample:
        print(f"--- sample ---\n{sample}\n--------------")


# --- Helpers ------------------------------------------------------------------------------------------------


def _stopped_before_training(stop: StopFlag) -> int:
    print(f"{stop.signal_name} before training started: nothing was saved; run the same command to start "
          "again", file=sys.stderr)
    return 128 + signal.Signals[stop.signal_name].value


def _mesh_context(mesh):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _restore(ckpt, state, train_iter, log, step, budget: list):
    budget[0] -= 1
    if budget[0] < 0:
        raise TooManyRestores(f"more than the allowed restores at step {step}: the failure is not transient")
    restored = ckpt.restore_latest(jax.tree.map(ocp.utils.to_shape_dtype_struct, state), train_iter)
    if restored is None:
        log.event(step, "no checkpoint to restore: continuing from the current state")
        return state.replace(guard=state.guard.replace(consecutive_bad=jnp.zeros((), jnp.int32))), step
    new_step, new_state = restored
    log.event(step, f"restored checkpoint of step {new_step}")
    log.rewind(int(new_step))
    return _like(new_state, state), int(new_step)


def _in_host_memory(shardings):
    """The same layouts in pinned host memory: the optimizer state waits there between steps."""
    return jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), shardings)


def _like(restored, live):
    """Place restored arrays exactly as the live ones (same shardings): the same executable runs on them."""
    return jax.device_put(restored, jax.tree.map(lambda x: x.sharding, live))


def _corrupt_one_replica(state, mesh, log, step):
    """The bitflip fault on a mesh: one device's copy of a replicated parameter silently differs."""
    params = state.params
    leaves, treedef = jax.tree.flatten(params)
    replicated = [j for j, x in enumerate(leaves) if x.sharding.is_fully_replicated]
    i = max(replicated, key=lambda j: leaves[j].size)
    device = mesh.devices.flat[-1]
    leaves[i] = flip_bit_on_device(leaves[i], device)
    log.event(step, f"injected a bit flip into one replica of a parameter on {device}")
    return state.replace(params=jax.tree.unflatten(treedef, leaves))


def _sample(model, tokenizer, prompt: str, n: int) -> str:
    ids = tokenizer.encode(prompt).ids or [1]
    out = lj.generate(model, jnp.asarray([ids], jnp.int32), n)
    return prompt + tokenizer.decode([int(t) for t in out[0]])
