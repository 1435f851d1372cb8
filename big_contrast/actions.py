"""The periodic actions of the training loop: after each step, every action that is due runs.

  AgreeOnStop      several processes: at each logging and checkpoint step, whether any of
                   them received SIGTERM or Ctrl-C (all then save and stop at that step)
  ReportFirstStep  the compilation time, kept out of the throughput and the ETA
  CheckFinite      a NaN or Inf in any step's loss, gradients or parameters stops the run
  LogMetrics       interval means to metrics.jsonl / TensorBoard and a progress line
  SaveCheckpoint   state + data position, every ``checkpoint_every`` steps, at the end, on a signal
  StopOnSignal     after SIGTERM or Ctrl-C: the checkpoint of the step is saved, the run stops
                   (evaluations due at that step run on the rerun)
  Evaluate         the config's evaluators, on the online and the averaged (EMA) weights

Host syncs happen only where CheckFinite and LogMetrics run: at logging steps and before every
save, so every checkpoint written has been checked finite.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time

import jax

from big_contrast import distributed, evaluators as evaluators_lib
from big_contrast.train_state import NONFINITE_PARTS, evaluation_weights

# Metrics that describe the logged step itself rather than an average over the interval.
LAST_VALUE_METRICS = ("learning_rate",)


class NonFiniteError(RuntimeError):
    """A step produced a NaN or infinite loss, gradient or parameter; nothing after the last
    checked checkpoint was saved."""


class Interrupted(RuntimeError):
    """The run stopped on SIGTERM or Ctrl-C after saving; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """SIGTERM and the first Ctrl-C ask the loop to save and stop at the end of the current
    step; a second Ctrl-C stops at once without saving. Handlers are installed only in the
    main thread and restored on exit.

    ``stop`` is the signal the run acts on: in one process the one received; with several, the
    one any process received, known to all only after ``agree()`` (AgreeOnStop), so that they
    all save the same step."""

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: signal.Signals | None = None
        self._agreed: signal.Signals | None = None
        self._previous = {}

    @property
    def stop(self) -> signal.Signals | None:
        return self.received if jax.process_count() == 1 else self._agreed

    def agree(self) -> None:
        """Collective: every process learns whether any of them received a signal."""
        names = [name for name in distributed.allgather_json(
            self.received.name if self.received else None) if name]
        if names and self._agreed is None:
            self._agreed = signal.Signals[names[0]]

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in self._SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        del frame
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.received = signal.Signals(signum)
        print(f"\n{self.received.name} received: saving a checkpoint after this step, then "
              "stopping" + (" (Ctrl-C again to stop without saving)"
                            if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)


class AgreeOnStop:
    """In a multi-process run, shares the stop signals at steps where the host syncs anyway
    (``regular_sync``: logging and scheduled checkpoints), so no extra sync stalls a step."""

    def __init__(self, signals: StopSignals, regular_sync):
        self.signals, self.regular_sync = signals, regular_sync

    def due(self, step: int) -> bool:
        return jax.process_count() > 1 and self.regular_sync(step)

    def __call__(self, step: int, state) -> None:
        self.signals.agree()


class StepMetrics:
    """Each step's metrics, kept on device until the next host sync fetches them all at once."""

    def __init__(self):
        self._device: list[tuple[int, dict]] = []
        self._host: list[tuple[int, dict]] = []

    def add(self, step: int, metrics: dict) -> None:
        self._device.append((step, metrics))

    def interval(self) -> list[tuple[int, dict]]:
        """(step, metrics as floats) of every step since the last ``clear``."""
        if self._device:
            fetched = jax.device_get([m for _, m in self._device])
            self._host += [(s, m) for (s, _), m in zip(self._device, fetched)]
            self._device = []
        return self._host

    def clear(self) -> None:
        self._host = []


class ReportFirstStep:
    """Prints the first step's time (compilation included) and restarts the throughput clock."""

    def __init__(self, first_step: int, progress):
        self.first_step, self.progress = first_step, progress

    def due(self, step: int) -> bool:
        return step == self.first_step

    def __call__(self, step: int, state) -> None:
        jax.block_until_ready(state.step)
        print(f"First step done in {time.perf_counter() - self.progress.start_time:.1f}s "
              "(compilation included)", flush=True)
        self.progress.update(step)


class SaveCheckpoint:
    def __init__(self, checkpointer, data, every: int, total_steps: int, signals: StopSignals):
        self.checkpointer, self.data = checkpointer, data
        self.every, self.total_steps, self.signals = every, total_steps, signals

    def scheduled(self, step: int) -> bool:
        """A checkpoint step by the schedule alone (every ``every`` steps, and the last)."""
        return step % self.every == 0 or step == self.total_steps

    def due(self, step: int) -> bool:
        return self.scheduled(step) or self.signals.stop is not None

    def __call__(self, step: int, state) -> None:
        self.checkpointer.save(step, state, self.data)
        if step == self.total_steps:  # the final evaluations may take long: secure it first
            self.checkpointer.wait()


class CheckFinite:
    """Stops the run at the first step whose loss, gradients or parameters are not finite."""

    def __init__(self, metrics: StepMetrics, sync_due, checkpointer):
        self.metrics, self.due, self.checkpointer = metrics, sync_due, checkpointer

    def __call__(self, step: int, state) -> None:
        for at, values in self.metrics.interval():
            bits = int(values["nonfinite"])
            if bits:
                parts = [name for bit, name in NONFINITE_PARTS.items() if bits & bit]
                self.checkpointer.wait()
                last = self.checkpointer.latest_step()
                raise NonFiniteError(
                    f"step {at}: {' and '.join(parts)} became NaN or infinite; stopped without "
                    "saving. " + (f"The last good checkpoint is step {last} in "
                                  f"{self.checkpointer.directory}" if last is not None
                                  else "No checkpoint was written before it"))


class LogMetrics:
    """Interval means (the learning rate: its value at the logged step) and a progress line."""

    def __init__(self, metrics: StepMetrics, sync_due, writer, progress, data):
        self.metrics, self.due = metrics, sync_due
        self.writer, self.progress, self.data = writer, progress, data

    def __call__(self, step: int, state) -> None:
        interval = [m for _, m in self.metrics.interval()]
        self.metrics.clear()
        record = {k: float(sum(m[k] for m in interval) / len(interval))
                  for k in interval[0] if k != "nonfinite"}
        record.update({k: float(interval[-1][k]) for k in LAST_VALUE_METRICS if k in record})
        self.progress.update(step)
        record["samples_per_second"] = self.progress.samples_per_second
        record["skipped_records"] = self.data.skipped_total
        self.writer.write(step, record)
        print(self.progress.line(step, record), flush=True)


class Evaluate:
    """Runs the evaluators that are due; with EMA on, on both weight sets ('ema/' prefix)."""

    def __init__(self, evaluators, weights: tuple[str, ...], total_steps: int, writer, progress):
        self.evaluators, self.weights = evaluators, weights
        self.total_steps, self.writer, self.progress = total_steps, writer, progress
        self.results: dict = {}

    def due(self, step: int) -> bool:
        return any(e.due(step, self.total_steps) for e in self.evaluators)

    def __call__(self, step: int, state, only=None) -> None:
        due = [e for e in self.evaluators if e.due(step, self.total_steps)
               and (only is None or e.name in only)]
        began = time.perf_counter()
        results = run_evaluations(due, state, self.weights)
        self.results.update(results)
        self.writer.write(step, results)
        print("  eval: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()), flush=True)
        self.progress.pause(time.perf_counter() - began)

    def is_result(self, key: str) -> bool:
        return result_of(key, self.evaluators) is not None

    def missing(self, step: int, recorded) -> set[str]:
        return unfinished(self.evaluators, step, self.total_steps, recorded)


def run_evaluations(evaluators, state, weights: tuple[str, ...]) -> dict:
    """Every evaluator on each of ``weights`` ('online', 'ema': results prefixed 'ema/');
    samples they keep (generated captions) are printed under the same prefix."""
    results = {}
    for which in weights:
        params, model_state = evaluation_weights(state, which)
        prefix = "ema/" if which == "ema" else ""

        def show(line, prefix=prefix):
            print(f"  {prefix}{line}", flush=True)

        results.update({prefix + k: v for k, v in
                        evaluators_lib.run_all(evaluators, params, model_state, show).items()})
    return results


def result_of(key: str, evaluators) -> str | None:
    """The evaluator a metric key ('<eval>/<metric>' or 'ema/<eval>/<metric>', where the
    metric may itself hold slashes, e.g. 'knn/val/top1') belongs to."""
    names = {e.name for e in evaluators}
    parts = key.split("/")
    if len(parts) > 2 and parts[0] == "ema" and parts[1] in names:
        return parts[1]
    return parts[0] if len(parts) >= 2 and parts[0] in names else None


def unfinished(evaluators, step: int, total_steps: int, recorded) -> set[str]:
    """Names of the evaluators due at ``step`` with no result among the keys ``recorded``."""
    done = {result_of(key, evaluators) for key in recorded}
    return {e.name for e in evaluators if e.due(step, total_steps) and e.name not in done}


class StopOnSignal:
    """After SIGTERM or Ctrl-C: stop. SaveCheckpoint is due at the first step that sees the
    signal and runs before this action, so the step's checkpoint is saved."""

    def __init__(self, signals: StopSignals, checkpointer, rerun_hint: str):
        self.signals, self.checkpointer, self.rerun_hint = signals, checkpointer, rerun_hint

    def due(self, step: int) -> bool:
        return self.signals.stop is not None

    def __call__(self, step: int, state) -> None:
        self.checkpointer.wait()
        stop = self.signals.stop
        raise Interrupted(f"interrupted by {stop.name} at step {step}; the checkpoint of step "
                          f"{step} is saved. {self.rerun_hint}", 128 + int(stop))
