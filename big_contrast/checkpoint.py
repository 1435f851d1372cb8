"""Orbax checkpoints of the train state together with the data position and a format record.

Saves are asynchronous (the step loop continues while arrays are written) and atomic: a run
killed mid-save leaves the previous checkpoint as the latest one. Every process writes its
shards of the state; the data position of all processes is gathered into one JSON record, so a
checkpoint restores onto any mesh and any number of processes. Every checkpoint carries a small
JSON record (format version and the train state's tree of shapes), so a checkpoint that no
longer matches the code is named as such instead of failing inside orbax.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

FORMAT_VERSION = 2  # 2: one data-position record for all processes
_SHOWN = 6  # differing tree paths listed in an error message

# Orbax writes a replicated array in slices, one per replica, each cut by a jit(slice) that
# compiles once per shape and device: the first save of a train state of 736 small arrays on
# 8 devices spent 27 s compiling those (1.3 s once only arrays whose slices reach 1 MiB are
# split, the rest written whole by one replica). Big replicated arrays still write in
# parallel.
_REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20
_absl_logger = logging.getLogger("absl")
_level = _absl_logger.level
_absl_logger.setLevel(logging.ERROR)  # orbax logs a warning about the override itself
try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=_REPLICA_PARALLEL_MIN_SLICE_BYTES), override=True)
finally:
    _absl_logger.setLevel(_level)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, found or restored; the message says what to do."""


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))
                    for k in path)


def describe_tree(tree) -> dict[str, list]:
    """{'params/image_tower/kernel': [shape, dtype], ...}: what a checkpoint must match. Dict
    keys and dataclass fields read alike, so a dict of some state fields compares with the
    whole state."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_name(path): [list(leaf.shape), str(leaf.dtype)] for path, leaf in leaves}


def tree_differences(saved: dict, expected: dict) -> list[str]:
    """Human-readable differences between two describe_tree() results, most useful first."""
    missing = [k for k in expected if k not in saved]
    extra = [k for k in saved if k not in expected]
    changed = [f"{k}: {saved[k][0]} {saved[k][1]} in the checkpoint, {expected[k][0]} "
               f"{expected[k][1]} in the code" for k in expected if k in saved and saved[k] != expected[k]]
    lines = []
    if missing:
        lines.append(f"{len(missing)} array(s) the code expects are not in the checkpoint, e.g. "
                     + ", ".join(missing[:_SHOWN]))
    if extra:
        lines.append(f"{len(extra)} array(s) in the checkpoint are unknown to the code, e.g. "
                     + ", ".join(extra[:_SHOWN]))
    if changed:
        lines.append(f"{len(changed)} array(s) changed shape or dtype, e.g. "
                     + "; ".join(changed[:_SHOWN]))
    return lines


class Checkpointer:
    """workdir/checkpoints/<step>/{state, data, meta}; keeps the newest ``keep`` checkpoints."""

    def __init__(self, workdir: str, keep: int = 2, async_save: bool = True, create: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        if not create and not os.path.isdir(self.directory):
            raise CheckpointError(f"no checkpoints in {os.path.abspath(workdir)}: it has no "
                                  f"checkpoints/ folder ({_listing(workdir)}); train first")
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                                     enable_async_checkpointing=async_save))
        except OSError as e:
            raise CheckpointError(f"cannot create the checkpoint folder {self.directory}: "
                                  f"{e.strerror or e}") from e
        self._pending: int | None = None  # the step of a save that may still be writing

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, data_iterator=None) -> None:
        """Starts writing ``state`` (a pytree of jax.Arrays) and the iterator's position (its
        get_state(), collective); raises CheckpointError if this write or the previous
        asynchronous one failed. Every process calls it."""
        self.wait()
        items = {"state": ocp.args.StandardSave(state),
                 "meta": ocp.args.JsonSave({"format_version": FORMAT_VERSION, "step": step,
                                            "state": describe_tree(state)})}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonSave(data_iterator.get_state())
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            raise self._write_error(step, e) from e
        self._pending = step

    def _write_error(self, step: int, error: Exception) -> CheckpointError:
        previous = [s for s in self.all_steps() if s != step]
        intact = (f"the previous checkpoint (step {previous[-1]}) is intact and a rerun resumes "
                  "from it" if previous else "there is no earlier checkpoint")
        return CheckpointError(f"writing the checkpoint of step {step} to {self.directory} failed "
                               f"({type(error).__name__}: {error}); {intact}")

    def _meta(self, step: int) -> dict:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except (KeyError, FileNotFoundError, ValueError):
            return {}

    def check_step(self, step: int) -> None:
        if step not in self._manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available steps: {self.all_steps() or 'none'}")

    def check_compatible(self, step: int, abstract_tree, what: str = "train state") -> None:
        """Raises CheckpointError naming what differs between the checkpoint and the code."""
        meta = self._meta(step)
        version = meta.get("format_version", 0)
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"the checkpoint of step {step} in {self.directory} has format version {version}; "
                f"this code reads version {FORMAT_VERSION}. Train into a new workdir, or evaluate "
                "it with the version of big_contrast that wrote it")
        saved = meta["state"]
        expected = describe_tree(abstract_tree)
        if what != "train state":  # a part of the state: compare only those fields
            fields = {k.split("/")[0] for k in expected}
            saved = {k: v for k, v in saved.items() if k.split("/")[0] in fields}
        differences = tree_differences(saved, expected)
        if differences:
            raise CheckpointError(
                f"the checkpoint of step {step} in {self.directory} does not match the {what} this "
                "code builds from the config: " + "; ".join(differences))

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores the state into ``abstract_state``'s shapes and shardings; when a data
        iterator is given its position is restored as well."""
        self.check_step(step)
        self.check_compatible(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None:
            data_iterator.set_state(restored["data"])
        return restored["state"]

    def restore_fields(self, step: int, abstract_fields: dict) -> dict:
        """Restores only some top-level fields of the train state, e.g. {'params': ...,
        'model_state': ...} for evaluation (the optimizer state is never read)."""
        self.check_step(step)
        self.check_compatible(step, abstract_fields, what="weights")
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_fields)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract_fields, restore_args=restore_args, partial_restore=True)))
        return restored["state"]

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is written; raises CheckpointError (once)
        if it failed."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            if step is not None:  # not reported yet
                raise self._write_error(step, e) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def _listing(folder: str) -> str:
    if not os.path.isdir(folder):
        return "the folder does not exist"
    names = sorted(os.listdir(folder))
    return "it holds " + (", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
                          if names else "nothing")
