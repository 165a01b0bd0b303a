"""Training-run checkpoints: orbax state + grain iterator position, with an integrity check.

Each saved step is one orbax step directory holding two items: "state" (any pytree of arrays: parameters,
optimizer state, step counters, guard state) and "data" (the grain `DatasetIterator` position). Saves are
asynchronous: orbax copies device arrays to host before `maybe_save` returns (so the caller may donate or
delete them), then writes and atomically finalizes the directory in the background. `keep` bounds how many
steps stay on disk (orbax max_to_keep).

Integrity. Orbax's atomic rename hides saves that die before finalize, but on a local filesystem it neither
notices a step directory that lost its commit marker nor a committed file truncated later: it restores such a
step silently (checked with orbax 0.12.8, which read a checkpoint whose OCDBT data files were truncated
without complaint). So after a save is finalized we write our own manifest, `<step>/integrity.json`, listing
every file in the step with its size and crc32 (crc can be switched off for very large runs: then sizes only).
The manifest is this module's commit marker:
  - a step without a manifest is an interrupted save (killed between orbax's finalize and our manifest, or
    made by other code) and is not trusted;
  - a listed file that is missing, has another size or another crc32 marks the step corrupt;
  - `<step>.orbax-checkpoint-tmp-*` directories are saves that died before orbax finalized them.
`restore_latest` reports every such problem through `log` (naming the step and the problem), moves a bad step
aside to `<step>.corrupt` (so a later save of the same step number does not collide, and the evidence stays
for a human), removes dead temporary directories, and restores the newest good step. A restore error on a step
whose files verified is NOT treated as corruption (it is almost always an abstract state that does not match
the checkpoint) and is raised. Single-host: manifests are written and bad steps moved by process 0 only; a
multi-host run needs a barrier around `restore_latest` that this module does not provide.

Signals: `install_stop_signals` turns SIGTERM/SIGINT into a flag that the training loop polls to force a final
save and exit cleanly; a SIGINT while already stopping raises KeyboardInterrupt so Ctrl-C twice still kills a
stuck run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

MANIFEST = "integrity.json"
_TMP_DIR = re.compile(r"^(\d+)\.orbax-checkpoint-tmp-")
_CHUNK = 1 << 20


class CheckpointIntegrityError(RuntimeError):
    """No checkpoint in the run directory passed the integrity check."""


# ----------------------------------------------------------------------------------------- integrity manifest
def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _step_files(step_dir: Path) -> list[Path]:
    """Every regular file under a step directory except the manifest itself, in a stable order."""
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: str | os.PathLike, *, checksums: bool = True) -> dict:
    """Write `<step_dir>/integrity.json` = {relative path: [size, crc32 or null]} for every file (atomic).

    Args:
      step_dir: a finalized orbax step directory.
      checksums: also record crc32 (reads every byte); False records sizes only.
    Returns:
      The manifest dict that was written.
    """
    step_dir = Path(step_dir)
    files = {str(p.relative_to(step_dir)): [p.stat().st_size, _crc32(p) if checksums else None]
             for p in _step_files(step_dir)}
    manifest = {"version": 1, "files": files}
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=0, sort_keys=True))
    os.replace(tmp, step_dir / MANIFEST)  # a reader sees either no manifest or a whole one
    return manifest


def verify_step_dir(step_dir: str | os.PathLike) -> str | None:
    """Check a step directory against its manifest.

    Args:
      step_dir: an orbax step directory.
    Returns:
      None when every listed file is present with the recorded size (and crc32), else a one-line problem.
    """
    step_dir = Path(step_dir)
    path = step_dir / MANIFEST
    if not path.is_file():
        return f"no {MANIFEST} (its save was interrupted before it was verified)"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for rel, (size, crc) in sorted(files.items()):
        p = step_dir / rel
        if not p.is_file():
            return f"file {rel} is missing"
        actual = p.stat().st_size
        if actual != size:
            return f"file {rel} has {actual} bytes, expected {size} (truncated or overwritten)"
        if crc is not None and _crc32(p) != crc:
            return f"file {rel} is corrupt (crc32 mismatch)"
    return None


# ----------------------------------------------------------------------------------------------- checkpointer
def _as_step(step) -> int:
    """A step as a plain non-negative int
    (a jax/numpy scalar would otherwise name the directory 'Array(…)')."""
    try:
        value = int(step)
    except (TypeError, ValueError):
        raise TypeError(f"checkpoint step must be an integer, got {step!r}") from None
    if value < 0 or value != step:
        raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
    return value


class RunCheckpointer:
    """Periodic async checkpoints of (state pytree, grain iterator) with integrity-checked restore.

    Args:
      directory: run checkpoint directory (created if absent).
      keep: number of most recent steps kept on disk.
      save_every: `maybe_save` saves when step % save_every == 0 (or when forced).
      async_save: write in the background (orbax async); False blocks until each save is committed.
      checksums: record and verify crc32 of every file (False: sizes only, cheaper for huge checkpoints).
      log: called with one human-readable line per notable event (bad checkpoints, restores).
    """

    def __init__(self, directory, *, keep: int = 3, save_every: int = 100, async_save: bool = True,
                 checksums: bool = True, log: Callable[[str], Any] = print):
        for name, value in (("keep", keep), ("save_every", save_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RunCheckpointer {name} must be a positive integer, got {value!r}")
        self.directory = Path(directory).absolute()
        self.keep, self.save_every, self.async_save = keep, save_every, async_save
        self.checksums, self.log = checksums, log
        self._primary = jax.process_index() == 0
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                               enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)
        self._watcher: threading.Thread | None = None
        self._watch_error: tuple[int, BaseException] | None = None

    # ---------------------------------------------------------------------------------------------- saving
    def maybe_save(self, step: int, state, data_iter=None, force: bool = False) -> bool:
        """Start a save of `state` and the iterator position at `step` if it is due (or forced).

        Args:
          step: training step the state belongs to (the state after `step` updates).
          state: pytree of jax/numpy arrays and scalars.
          data_iter: grain DatasetIterator whose position is saved (None: state only).
          force: save even if step % save_every != 0 (e.g. on a stop signal or at the end of training).
        Returns:
          True if a save was started, False if not due or this step is already saved.
        """
        step = _as_step(step)
        if not force and step % self.save_every:
            return False
        if step in self._manager.all_steps():
            return False
        self._join_watcher()  # one save in flight at a time; also surfaces an error of the previous save
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if self.async_save:
            self._watcher = threading.Thread(target=self._finish, args=(step,), name=f"ckpt-manifest-{step}",
                                             daemon=True)
            self._watcher.start()
        else:
            self._finish(step)
            self._raise_watch_error()
        return True

    def _finish(self, step: int) -> None:
        """Wait for orbax to finalize `step`, then write its manifest (on the watcher thread when async)."""
        try:
            self._manager.wait_until_finished()
            step_dir = self.directory / str(step)
            if self._primary and step_dir.is_dir():  # may be pruned already if keep is tiny
                write_manifest(step_dir, checksums=self.checksums)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread by _raise_watch_error
            self._watch_error = (step, e)

    def _join_watcher(self) -> None:
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        self._raise_watch_error()

    def _raise_watch_error(self) -> None:
        if self._watch_error is not None:
            step, err = self._watch_error
            self._watch_error = None
            raise RuntimeError(f"checkpoint save of step {step} in {self.directory} failed: {err}") from err

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed and its manifest written."""
        self._manager.wait_until_finished()
        self._join_watcher()

    def close(self) -> None:
        """Wait for pending saves, then release orbax's resources."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- restoring
    def all_steps(self) -> list[int]:
        """Steps orbax sees on disk, ascending (not yet verified; `restore_latest` checks them)."""
        return sorted(self._manager.all_steps())

    def verify(self, step: int) -> str | None:
        """None if `step`'s files match its manifest, else the problem (see `verify_step_dir`)."""
        return verify_step_dir(self.directory / str(step))

    def restore(self, step: int, abstract_state, data_iter=None):
        """Restore exactly `step` (no fallback); raises CheckpointIntegrityError if it fails verification.

        Args:
          step: a saved step.
          abstract_state: pytree of jax.ShapeDtypeStruct (with .sharding for sharded restore) or arrays,
            matching the saved "state" tree; e.g. `jax.tree.map(ocp.utils.to_shape_dtype_struct, state)`.
          data_iter: grain DatasetIterator set in place to the saved position (None: leave data alone).
        Returns:
          The restored state pytree (arrays placed as `abstract_state` asks).
        """
        step = _as_step(step)
        self.wait()
        if step not in self._manager.all_steps():
            have = self.all_steps()
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; have {have}")
        problem = self.verify(step)
        if problem is not None:
            raise CheckpointIntegrityError(f"checkpoint step {step} in {self.directory}: {problem}")
        return self._restore_verified(step, abstract_state, data_iter)

    def _restore_verified(self, step: int, abstract_state, data_iter):
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            # Files verified, so this is a mismatch between abstract_state and the checkpoint, not corruption.
            raise RuntimeError(f"restoring verified checkpoint step {step} from {self.directory} failed "
                               f"(does abstract_state match what was saved?): {e}") from e
        return restored["state"]

    def restore_latest(self, abstract_state, data_iter=None):
        """Restore the newest step that passes verification, reporting and moving aside every bad newer one.

        Args:
          abstract_state: as in `restore`.
          data_iter: as in `restore`.
        Returns:
          (step, state) for the restored step, or None if the directory holds no checkpoints at all.
        Raises:
          CheckpointIntegrityError: checkpoints exist but none passes verification.
        """
        self.wait()
        self._drop_unfinished_tmp_dirs()
        self._manager.reload()  # the directory may have changed under us (another run, a human, a crash)
        steps = self.all_steps()
        if not steps:
            return None
        problems = []
        for step in reversed(steps):
            problem = self.verify(step)
            if problem is None:
                state = self._restore_verified(step, abstract_state, data_iter)
                self.log(f"checkpoint: restored step {step} from {self.directory}")
                return step, state
            moved = self._quarantine(step)
            self.log(f"checkpoint: step {step} in {self.directory} is unusable: {problem}; "
                     f"moved to {moved.name}, trying an earlier one")
            problems.append(f"step {step}: {problem}")
        raise CheckpointIntegrityError(f"no usable checkpoint in {self.directory}: " + "; ".join(problems))

    def _quarantine(self, step: int) -> Path:
        """Rename a bad step dir to `<step>.corrupt[-k]` (orbax ignores non-integer names) and forget it."""
        src = self.directory / str(step)
        dst, k = self.directory / f"{step}.corrupt", 1
        while dst.exists():
            k += 1
            dst = self.directory / f"{step}.corrupt-{k}"
        if self._primary:
            os.rename(src, dst)
        self._manager.reload()
        return dst

    def _drop_unfinished_tmp_dirs(self) -> None:
        """Report and delete temporary directories of saves that died before orbax finalized them."""
        for path in sorted(self.directory.iterdir()):
            match = _TMP_DIR.match(path.name)
            if match and path.is_dir():
                self.log(f"checkpoint: step {match.group(1)} in {self.directory} was never finalized "
                         f"(interrupted save left {path.name}); ignored and removed")
                if self._primary:
                    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- signals
class StopFlag:
    """Set by SIGTERM/SIGINT: `requested` becomes True and `signal_name` names the first signal received."""

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C while already stopping: the user wants out now
        if not self.requested:  # acknowledged at once, though the step under way runs to its end
            print(f"\n{signal.Signals(signum).name} received: stopping after the current step (a running "
                  "compile finishes first); Ctrl-C again to quit at once", file=sys.stderr, flush=True)
        self.requested = True
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def uninstall(self) -> None:
        """Restore the handlers that were installed before `install_stop_signals`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopFlag:
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()


def install_stop_signals(signums=(signal.SIGTERM, signal.SIGINT)) -> StopFlag:
    """Route SIGTERM and SIGINT to a StopFlag that the training loop polls (then force-saves and exits).

    Must be called from the main thread (a Python rule for signal handlers).
    Returns:
      The flag; call `flag.uninstall()` (or use it as a context manager) to put the old handlers back.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_stop_signals must be called from the main thread (Python signal rule)")
    flag = StopFlag()
    for signum in signums:
        flag._previous[signum] = signal.signal(signum, flag._handle)
    return flag
