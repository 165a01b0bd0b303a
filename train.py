"""Train LongCat end to end: jit-compiled, deterministic on request, resumable.

    python train.py                                   # tiny LongCat-2.0, every feature on, stdlib corpus, CPU
    python train.py --preset small --steps 2000 --mesh dp=2,tp=4 --out runs/small
    python train.py --resume --out runs/default       # continue exactly where a run stopped
    python train.py --init-from runs/default --data my.jsonl --steps 200 --out runs/ft   # fine-tune a run
    python train.py --eval-only --out runs/default    # the held-out loss of its newest good checkpoint
    python train.py --config my_run.yaml model.num_layers=4 model.hidden_size=256 --dtype bfloat16

Settings come from flags, a --config file (JSON or YAML, the flags' names as keys, `model:` for overrides;
a run's OUT/run_config.json is one) and `model.FIELD=VALUE` overrides of the preset's model config; the
command line wins over the file.

The command line only: the run itself is `longcat_jax.training.loop`. Writes OUT/metrics.jsonl,
OUT/tensorboard/, OUT/events.log, OUT/checkpoints/, OUT/tokenizer.json, OUT/loss_curve.png, OUT/sample.txt and
OUT/summary.json (--eval-only: OUT/eval.json only).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

import longcat_jax as lj
from longcat_jax.model import context_parallel
from longcat_jax.training.host_allocator import keep_freed_host_memory
from longcat_jax.training.init_weights import init_source_kind, init_source_tokenizer
from longcat_jax.training.loop import REMAT_POLICIES, run
from longcat_jax.training.reliability import parse_fault
from longcat_jax.training.run_settings import (
    DEFINING,
    config_file_argv,
    model_overrides,
    steps_or_fraction,
    take_saved,
)
from sharding import distributed
from sharding.divisibility import check_divisible
from sharding.mesh import abstract_mesh, parse_mesh, resolve_sizes


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    argv = _with_config_file(p, list(sys.argv[1:] if argv is None else argv))
    args = p.parse_intermixed_args(argv)
    try:
        args.model = model_overrides(args.overrides)
    except ValueError as e:
        p.error(str(e))
    if args.eval_only and not args.init_from:  # evaluating OUT's own checkpoint: its settings by default
        take_saved(args, given=_given_flags(argv))
    return _checked(p, args)


def _with_config_file(p: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` after the settings of its --config file, if any (so the command line wins)."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if "--config" in argv[:-1]:
        path = argv[argv.index("--config") + 1]
    if path is None:
        return argv
    try:
        file_argv, skipped = config_file_argv(path, p)
    except ValueError as e:
        p.error(str(e))
    if skipped:
        print(f"--config {path}: left out {', '.join(skipped)} (settings of one invocation: give them on the "
              "command line)", file=sys.stderr)
    return file_argv + argv


def _given_flags(argv) -> set[str]:
    """The settings (argparse dests) that the command line (with its --config file) gives, defaults aside."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(p.parse_intermixed_args(argv)))
    return given | {"model"} if given & {"overrides"} else given


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train LongCat (JAX).", formatter_class=_HelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="model.FIELD=VALUE",
                   help="change a field of the preset's model config, e.g. model.num_layers=4 "
                        "model.n_routed_experts=16 (the fields of longcat_jax.Config)")
    p.add_argument("--config", metavar="FILE",
                   help="settings from a JSON or YAML file (keys: these flags' names with underscores, and "
                        "`model` for overrides; a run's run_config.json works); the command line wins")
    p.add_argument("--preset", default="tiny", choices=lj.Config.PRESETS, help="model size and features")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype of activations and matmuls; parameters and the optimizer stay float32 "
                        "unless model.param_dtype=bfloat16")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of the whole run")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step (divisible by dp)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (documents are packed)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="N",
                   help="split each step's batch into N micro-batches run one after another, their gradients "
                        "averaged (activation memory of batch-size / N rows)")
    p.add_argument("--microbatches", type=int, default=1, metavar="M",
                   help="pipeline parallelism: split each (micro-)batch into M microbatches that flow "
                        "through the pp stages one after another; the idle share of stage time is "
                        "(pp - 1) / (M + pp - 1) (needs a --mesh with pp > 1)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=steps_or_fraction, default=None,
                   help="learning-rate warm-up: steps, or a fraction (0-1) of the run "
                        "(default: 50 steps, at most 10%% of the run)")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "wsd"),
                   help="learning-rate decay after the warm-up (wsd: warmup-stable-decay)")
    p.add_argument("--optimizer", default="muon", choices=("muon", "adamw"),
                   help="muon: Muon for hidden matrices, AdamW for the rest; adamw: AdamW throughout")
    p.add_argument("--out", default="runs/default", help="run folder: checkpoints, logs, tokenizer, settings")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in OUT")
    p.add_argument("--init-from", metavar="PATH",
                   help="start from these weights with a fresh optimizer (fine-tuning): a Hugging Face "
                        "folder, an Orbax folder (python -m longcat_jax.convert --hf .. --out ORBAX) or a "
                        "train.py run, checkpoints or step folder (its newest good step); its model must "
                        "match --preset and the tokenizer's vocabulary, and a run's or Hugging Face folder's "
                        "tokenizer.json is the default --tokenizer (default: a fresh initialisation from "
                        "--seed)")
    p.add_argument("--eval-only", action="store_true",
                   help="only the held-out loss (--eval-batches batches) of OUT's newest good checkpoint, or "
                        "of the --init-from weights: printed and written to OUT/eval.json; trains and saves "
                        "nothing; settings not given are taken from OUT/run_config.json")
    p.add_argument("--mesh", default="", help="mesh axis sizes, e.g. dp=2,tp=2 (axes: dp pp cp ep tp vp)")
    p.add_argument("--fsdp", action="store_true",
                   help="fully sharded data parallel: parameters (and so their optimizer state) split over "
                        "dp along the model width, gathered per layer as it runs (needs a mesh with dp > 1)")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="multi-process run: process 0's address, with --num-processes and --process-id "
                        "(jax.distributed.initialize); every process runs the same command. Under SLURM, "
                        "Open MPI, Cloud TPU or a Kubernetes indexed Job, JAX reads all three from the "
                        "environment (default: one process unless such a launcher is detected)")
    p.add_argument("--num-processes", type=int, metavar="N", help="processes of a multi-process run")
    p.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 to N-1")
    p.add_argument("--deterministic", action="store_true",
                   help="bit-identical reruns (deterministic XLA ops)")
    p.add_argument("--data",
                   help="folder of text files, a .jsonl file with a `text` field, a text file of paragraphs, "
                        "or a folder written by `python -m longcat_jax.data prepare` (read lazily, with its "
                        "own tokenizer) (default: the Python standard library)")
    p.add_argument("--tokenizer", help="a tokenizer.json to use instead of training a BPE")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary when training a tokenizer")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument("--capacity-factor", type=float, metavar="F",
                   help="MoE expert capacity: each expert takes at most ceil(F * tokens * top-k / experts) "
                        "tokens of a batch and drops the rest (default: dropless)")
    p.add_argument("--mtp-weight", type=float, default=0.3, help="weight of the multi-token-prediction loss")
    p.add_argument("--z-loss", type=float, default=1e-4, help="weight of the logits' log-partition penalty")
    p.add_argument("--indexer-weight", type=float, default=1.0, help="weight of the indexer's KL loss")
    p.add_argument("--indexer-warmup-steps", type=steps_or_fraction, default=None,
                   help="dense-attention indexer warm-up stage: steps, or a fraction (0-1) of the run "
                        "(default: 50 steps, at most 25%% of the run)")
    p.add_argument("--balance-weight", type=float, default=1e-3, help="weight of the expert balance loss")
    p.add_argument("--bias-update-rate", type=float, default=1e-3,
                   help="step of the aux-loss-free router bias update")
    p.add_argument("--remat", default="none", choices=tuple(REMAT_POLICIES),
                   help="what each layer keeps for the backward (offload: saved outputs to host memory)")
    p.add_argument("--kernel-impl", default="reference", choices=("reference", "auto", "xla", "pallas"),
                   help="LSA and N-gram implementation after the dense warm-up (see pallas_kernels/)")
    p.add_argument("--offload-optimizer", action="store_true",
                   help="keep the optimizer state in pinned host memory between steps")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--eval-every", type=int, default=100,
                   help="steps between held-out losses, expert statistics and the selection recall")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation")
    p.add_argument("--abft", action="store_true", help="checksum-verify the LM-head matmul every step")
    p.add_argument("--fingerprint-every", type=int, default=50,
                   help="cross-replica check (meshes with dp > 1)")
    p.add_argument("--max-bad-steps", type=int, default=3, help="restore the last checkpoint after this many")
    p.add_argument("--max-restores", type=int, default=3, help="give up after this many restores in one run")
    p.add_argument("--inject-fault", help="nan-grad@STEP or bitflip@STEP (for tests)")
    p.add_argument("--prompt", help="prompt of the closing sample (default: the first line(s) of the first "
                                    "held-out document, at most 60 characters, cut at a line boundary)")
    p.add_argument("--sample-tokens", type=int, default=48, help="0 skips the closing sample")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or periodic progress lines")
    p.add_argument("--wandb", metavar="PROJECT",
                   help="also log the metrics to this Weights & Biases project (needs `pip install wandb`; "
                        "WANDB_MODE=offline needs no account); TensorBoard logging stays on "
                        "(default: no W&B)")
    p.add_argument("--log-every", type=int, default=10,
                   help="steps between progress lines when stderr is not a terminal")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep compiled programs in the persistent cache (~/.cache/longcat-jax/xla)")
    p.add_argument("--profile-steps", type=_step_range, help="A:B writes a JAX profiler trace of steps A..B "
                   "to OUT/profile (TensorBoard's profile plugin or Perfetto reads it)")
    p.add_argument("--allow-change", type=_setting_names, default=[],
                   help="with --resume: comma-separated settings that may differ from the saved run "
                        f"({', '.join(n.replace('_', '-') for n in DEFINING)})")
    return p


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless the help already says what the default does."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default:" in text else super()._get_help_string(action)


def _checked(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Checks that span flags or need the machine; p.error exits with a one-line message."""
    positive = ("steps", "batch_size", "seq_len", "save_every", "keep", "eval_every", "max_bad_steps",
                "log_every", "grad_accum", "microbatches")
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    try:  # before anything asks for devices: the mesh spans every process's devices
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except (ValueError, RuntimeError) as e:
        p.error(f"joining the multi-process run: {str(e).splitlines()[0]}")
    try:
        args.mesh_sizes = resolve_sizes(parse_mesh(args.mesh), jax.device_count())  # an auto axis filled
        args.fault = parse_fault(args.inject_fault) if args.inject_fault else None
    except ValueError as e:
        p.error(str(e))
    n_mesh = int(np.prod(list(args.mesh_sizes.values()) or [1]))
    if args.mesh and n_mesh != jax.device_count():
        p.error(f"--mesh {args.mesh} needs {n_mesh} devices, this machine has {jax.device_count()}")
    if args.fsdp and args.mesh_sizes.get("dp", 1) == 1:
        p.error("--fsdp shards parameters over dp: give a --mesh with dp > 1")
    if args.batch_size % args.grad_accum:
        p.error(f"--batch-size {args.batch_size} must divide by --grad-accum {args.grad_accum}")
    micro = args.batch_size // args.grad_accum
    if micro % args.mesh_sizes.get("dp", 1):
        p.error(f"rows per micro-batch ({micro}: --batch-size / --grad-accum) must divide by "
                f"dp={args.mesh_sizes['dp']}")
    if args.microbatches > 1 and args.mesh_sizes.get("pp", 1) == 1:
        p.error("--microbatches splits the batch over pipeline stages: give a --mesh with pp > 1")
    if micro % (args.mesh_sizes.get("dp", 1) * args.microbatches):
        p.error(f"rows per micro-batch ({micro}: --batch-size / --grad-accum) must divide by "
                f"dp={args.mesh_sizes.get('dp', 1)} x --microbatches {args.microbatches}")
    if args.mesh:  # the sequence over cp as well: an axis that does not divide is an error, not replication
        try:
            check_divisible({"batch": ((micro, args.seq_len), ("batch", "seq"))},
                            abstract_mesh(args.mesh_sizes))
        except ValueError as e:
            p.error(f"--seq-len {args.seq_len}: {e}")
        if args.mesh_sizes.get("cp", 1) > 1:  # the balanced layout cuts each row into 2 x cp chunks
            try:
                context_parallel.check_length(args.seq_len, args.mesh_sizes["cp"])
            except ValueError as e:
                p.error(f"--seq-len {args.seq_len}: {e}")
    try:
        lj.Config.preset(args.preset, dtype=args.dtype, **args.model)
    except (ValueError, TypeError) as e:
        p.error(f"--preset {args.preset} with model overrides {args.model}: {e}")
    if args.capacity_factor is not None and not args.capacity_factor > 0:
        p.error("--capacity-factor must be > 0 (leave it out for dropless routing)")
    paths = (("--data", args.data), ("--tokenizer", args.tokenizer), ("--init-from", args.init_from))
    for flag, path in paths:
        if path and not os.path.exists(path):
            p.error(f"{flag} {path}: no such file or folder")
    if args.init_from:
        try:
            kind = init_source_kind(args.init_from)
        except ValueError as e:
            p.error(str(e))
        if args.tokenizer is None:  # the vocabulary the weights were trained with
            args.tokenizer = init_source_tokenizer(args.init_from, kind)
    elif args.eval_only:
        ckpts = os.path.join(args.out, "checkpoints")
        if not os.path.isdir(ckpts) or not any(d.isdigit() for d in os.listdir(ckpts)):
            p.error(f"--eval-only: no checkpoint in {ckpts} to evaluate; train one first, or pass "
                    "--init-from PATH to evaluate other weights")
    if args.wandb:
        try:
            import wandb  # noqa: F401  (only asked whether it is there)
        except ImportError:
            p.error("--wandb: the wandb package is not installed (pip install wandb)")
    if args.fault and args.fault.kind == "bitflip":
        args.abft = True  # the checksum is what must catch the injected flip
    return args


def _step_range(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B (first and last step), got {text!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"expected 1 <= A <= B, got {text!r}")
    return a, b


def _setting_names(text: str) -> list[str]:
    names = [n.strip().replace("-", "_") for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in DEFINING]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown setting(s) {', '.join(unknown)}; these may change: "
                                         f"{', '.join(n.replace('_', '-') for n in DEFINING)}")
    return names


def main(argv=None) -> int:
    """Parse `argv` and train; the exit status (3: the failure kept coming back after every restore)."""
    return run(parse_args(argv))


if __name__ == "__main__":
    keep_freed_host_memory()  # before the first computation starts XLA's threads
    sys.exit(main())
