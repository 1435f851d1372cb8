"""Metric writers (JSONL + TensorBoard, every record carries its step), the progress line and
the final summary table. Only process 0 writes.

metrics.jsonl is the record of a run: on resume it is cut back to the restored step (a line
half-written by a kill is dropped) and the TensorBoard events are rewritten from it, so neither
holds a step twice.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import jax


METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
    """Appends {'step': s, **scalars} to workdir/metrics.jsonl and TensorBoard event files.

    ``resume_step``: the step a resumed run restarts from; records written after it by the
    interrupted run are dropped first (None: a fresh run, nothing is dropped).
    """

    def __init__(self, workdir: str, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        path = os.path.join(workdir, METRICS_FILE)
        kept = [r for r in read_jsonl(path) if resume_step is None or r["step"] <= resume_step]
        with open(path + ".tmp", "w", encoding="utf-8") as f:  # a kill now loses nothing
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path + ".tmp", path)
        self._jsonl = open(path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: start-up time counts

            events = os.path.join(workdir, TENSORBOARD_DIR)
            shutil.rmtree(events, ignore_errors=True)
            self._tb = SummaryWriter(events)
            for record in kept:
                self._add_events(record)

    def _add_events(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step":
                self._tb.add_scalar(key, value, global_step=record["step"])

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._add_events(record)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL file ([] if absent); a last line cut short by a kill is dropped."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}, is not JSON: {line[:80]!r}") from None
    return records


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Step throughput and ETA measured between logging points; the trainer calls ``update``
    after the first (compiling) step so that compilation never counts as throughput."""

    def __init__(self, total_steps: int, batch_size: int, first_step: int = 0):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self._last_step = first_step
        self._last_time = time.perf_counter()
        self.start_time = self._last_time
        self.samples_per_second = float("nan")

    def update(self, step: int) -> None:
        now = time.perf_counter()
        if step > self._last_step:
            self.samples_per_second = (step - self._last_step) * self.batch_size / (now - self._last_time)
        self._last_step, self._last_time = step, now

    def pause(self, seconds: float) -> None:
        """Excludes time spent on evaluation or checkpoints from the throughput."""
        self._last_time += seconds

    def eta_seconds(self, step: int) -> float:
        if not self.samples_per_second > 0:
            return float("nan")
        return (self.total_steps - step) * self.batch_size / self.samples_per_second

    def line(self, step: int, metrics: dict) -> str:
        width = len(str(self.total_steps))
        parts = [f"step {step:>{width}}/{self.total_steps}"]
        for key in ("loss", "learning_rate", "temperature", "bias"):
            if key in metrics:
                value = metrics[key]
                parts.append(f"{key.replace('learning_rate', 'lr')} {value:.4g}")
        parts.append(f"{self.samples_per_second:,.0f} samples/s")
        parts.append(f"ETA {_duration(self.eta_seconds(step))}")
        return " | ".join(parts)


def summary_table(title: str, rows: dict) -> str:
    """A two-column text table of name -> value."""
    width = max([len(k) for k in rows] + [len(title)])
    lines = [title, "-" * (width + 14)]
    for key, value in rows.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {text:>12}")
    return "\n".join(lines)
