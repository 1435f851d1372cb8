"""XLA compile time of a recipe's train step, with its layer stacks unrolled or scanned.

  python benchmarks/compile_time.py [--configs configs/clip.py:B/32 configs/align.py:L2]
      [--settings unrolled scan] [--per_device_batch 2]

The step is the trainer's (Experiment.train_step), lowered and compiled for the abstract
train state (StateFactory.abstract: shapes and shardings, nothing allocated) and a batch of
per_device_batch examples per device. Each measurement runs in a fresh process, so no cache
of an earlier one helps it. Printed: trace + lower seconds, XLA compile seconds, and the size
of the lowered program (StableHLO lines).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCAN = {"model.image.scan": "true", "model.text.scan": "true"}
# Overrides per setting: the recipe as written (its layer stacks unrolled), every layer stack
# scanned, scanned and rematerialised keeping the matmul outputs, scanned in bfloat16.
SETTINGS = {
    "unrolled": {},
    "scan": _SCAN,
    "scan+dots": {**_SCAN, "model.image.remat": "true", "model.text.remat": "true",
                  "model.image.remat_policy": "dots_saveable",
                  "model.text.remat_policy": "dots_saveable"},
    "scan+bf16": {**_SCAN, "model.dtype": "bfloat16"},
}
DEFAULT_CONFIGS = ("configs/clip.py:B/32", "configs/align.py:L2")


def tokenizer_overrides(config, folder: str) -> dict:
    """A tokenizer that needs no file from elsewhere, of the recipe's vocabulary size: 'words'
    or, for captioning objectives (which must decode), a word list written to ``folder``."""
    if config.objective != "coca":
        return {"text.tokenizer": "words"}
    from big_contrast.data.tokenizers import VocabularyTokenizer

    path = os.path.join(folder, "vocab.json")
    specials = VocabularyTokenizer([]).vocab_size
    VocabularyTokenizer([f"w{i}" for i in range(config.text.vocab_size - specials)]).save(path)
    return {"text.tokenizer": "vocab", "text.model_path": path}


def measure(config_arg: str, setting: str, per_device_batch: int) -> dict:
    """Seconds to trace + lower and to compile the config's train step under ``setting``."""
    import jax

    from big_contrast import config as config_lib
    from big_contrast.experiment import Experiment

    config = config_lib.load_config_file(os.path.join(REPO, config_arg))
    with tempfile.TemporaryDirectory() as folder:
        overrides = {**tokenizer_overrides(config, folder),
                     "batch_size": str(per_device_batch * jax.device_count()),
                     **SETTINGS[setting]}
        config_lib.apply_overrides(config, overrides)
        exp = Experiment(config, examples_per_epoch=config.batch_size)
    abstract = exp.state_factory.abstract()
    step = exp.train_step(abstract)
    batch = exp.abstract_batch(per_device_batch * exp.mesh.size)
    with jax.set_mesh(exp.mesh):
        began = time.perf_counter()
        lowered = step.lower(abstract, batch)
        lowered_at = time.perf_counter()
        lowered.compile()
        compiled_at = time.perf_counter()
    return {"config": config_arg, "setting": setting, "lower_s": lowered_at - began,
            "compile_s": compiled_at - lowered_at,
            "hlo_lines": lowered.as_text().count("\n")}


def run_isolated(config_arg: str, setting: str, per_device_batch: int, timeout: float) -> dict:
    """measure() in a fresh Python process (no compilation cache), or a row saying why not."""
    command = [sys.executable, __file__, "--one", config_arg, setting, str(per_device_batch)]
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"config": config_arg, "setting": setting, "error": f"over {timeout:.0f} s"}
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"config": config_arg, "setting": setting, "error": last}
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_row(row: dict) -> str:
    head = f"{row['config']:<24} {row['setting']:<10}"
    if "error" in row:
        return f"{head} failed: {row['error']}"
    return (f"{head} {row['lower_s']:>8.1f} {row['compile_s']:>10.1f} "
            f"{row['lower_s'] + row['compile_s']:>8.1f} {row['hlo_lines']:>10,}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--settings", nargs="+", default=["unrolled", "scan"],
                        choices=list(SETTINGS))
    parser.add_argument("--per_device_batch", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds allowed to one measurement")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args()
    if args.one:
        config_arg, setting, per_device_batch = args.one
        print(json.dumps(measure(config_arg, setting, int(per_device_batch))))
        return
    print(f"{'config':<24} {'setting':<10} {'lower s':>8} {'compile s':>10} {'total s':>8} "
          f"{'HLO lines':>10}", flush=True)
    for config_arg in args.configs:
        for setting in args.settings:
            print(format_row(run_isolated(config_arg, setting, args.per_device_batch,
                                          args.timeout)), flush=True)


if __name__ == "__main__":
    main()
