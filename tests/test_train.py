"""The trainer end to end: learning happens, 1 and 8 devices agree, SIGKILL + rerun equals an
uninterrupted run, a NaN stops the run with the last good checkpoint intact, and a folder of
PNG files trains and evaluates through the command-line entrypoints."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from big_contrast import checkpoint, metrics, train as train_lib
from big_contrast.experiment import Experiment
from tests.helpers import REPO, TINY_CLIP, tiny_clip_config, write_png_manifest


def _losses(workdir):
    return {r["step"]: r["loss"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if "loss" in r}


def _final_params(config, workdir):
    exp = Experiment(config, jax.devices()[:1])
    ckpt = checkpoint.Checkpointer(workdir)
    state = ckpt.restore(ckpt.latest_step(), exp.state_factory.abstract())
    ckpt.close()
    return jax.tree.map(np.asarray, state)


def test_loss_falls_and_every_record_carries_its_step(tmp_path):
    config = tiny_clip_config(total_steps=60, log_every=10, checkpoint_every=60,
                              **{"optim.lr": "3e-3", "optim.warmup_steps": "5"})
    summary = train_lib.train(config, str(tmp_path), jax.devices()[:1])
    losses = _losses(str(tmp_path))
    assert sorted(losses) == [10, 20, 30, 40, 50, 60]
    # ln(16) = 2.77 is chance for a batch of 16; the synthetic captions are learnable.
    assert losses[10] > 2.0 and losses[60] < losses[10] - 0.5
    assert summary["final_loss"] == losses[60] and summary["step"] == 60
    record = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))[-1]
    assert {"learning_rate", "grad_norm", "temperature", "samples_per_second"} <= set(record)


def test_one_and_eight_devices_give_the_same_losses(tmp_path):
    config = tiny_clip_config(total_steps=5, checkpoint_every=5)
    train_lib.train(config, str(tmp_path / "one"), jax.devices()[:1])
    train_lib.train(config, str(tmp_path / "eight"), jax.devices())
    one, eight = _losses(str(tmp_path / "one")), _losses(str(tmp_path / "eight"))
    assert sorted(one) == [1, 2, 3, 4, 5]
    for step in one:
        assert abs(one[step] - eight[step]) < 1e-4, (step, one[step], eight[step])


def test_fsdp_sharded_parameters_train_like_replicated_ones(tmp_path):
    config = tiny_clip_config(total_steps=3, checkpoint_every=3)
    train_lib.train(config, str(tmp_path / "dp"), jax.devices())
    config.mesh.data, config.mesh.fsdp = 2, 4
    train_lib.train(config, str(tmp_path / "fsdp"), jax.devices())
    dp, fsdp = _losses(str(tmp_path / "dp")), _losses(str(tmp_path / "fsdp"))
    for step in dp:
        assert abs(dp[step] - fsdp[step]) < 1e-4


def _command(entrypoint, workdir, *flags, config=TINY_CLIP):
    return [sys.executable, "-m", f"big_contrast.{entrypoint}", "--config", config,
            "--workdir", str(workdir), *flags]


_ENV = {**os.environ, "JAX_NUM_CPU_DEVICES": "2"}
_LONGER = ["--config.total_steps=24", "--config.checkpoint_every=4"]


def test_sigkill_and_rerun_equals_an_uninterrupted_run(tmp_path):
    subprocess.run(_command("train", tmp_path / "straight", *_LONGER), cwd=REPO, env=_ENV,
                   check=True, capture_output=True, timeout=300)
    # Kill the second run with SIGKILL (no chance to save) once it has passed step 13.
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command("train", killed, *_LONGER), cwd=REPO, env=_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if log.exists() and max([0] + list(_losses(str(killed)))) >= 13:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run(_command("train", killed, *_LONGER), cwd=REPO, env=_ENV,
                             check=True, capture_output=True, text=True, timeout=300)
    assert "Resumed from checkpoint at step" in resumed.stdout
    straight, again = _losses(str(tmp_path / "straight")), _losses(str(killed))
    assert sorted(again) == list(range(1, 25))  # records past the checkpoint were replaced
    assert again[24] == straight[24]
    config = tiny_clip_config(total_steps=24)
    a = _final_params(config, str(tmp_path / "straight"))
    b = _final_params(config, str(killed))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_make_train_step = train_lib.make_train_step

    def make_poisoned_step(*args, **kwargs):
        step_fn = real_make_train_step(*args, **kwargs)

        def poisoned(state, batch):
            new_state, step_metrics = step_fn(state, batch)
            if int(new_state.step) >= 5:  # from step 5 on the loss is NaN
                step_metrics = {**step_metrics, "loss": step_metrics["loss"] * np.nan}
            return new_state, step_metrics
        return poisoned

    monkeypatch.setattr(train_lib, "make_train_step", make_poisoned_step)
    config = tiny_clip_config(total_steps=8, checkpoint_every=3, log_every=1)
    with pytest.raises(train_lib.NonFiniteLossError, match="last good checkpoint is step 3"):
        train_lib.train(config, str(tmp_path), jax.devices()[:1])
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    assert ckpt.all_steps() == [3]
    ckpt.close()
    state = _final_params(config, str(tmp_path))
    assert int(state.step) == 3
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_png_manifest_trains_and_evaluates_through_the_entrypoints(tmp_path):
    manifest = write_png_manifest(tmp_path / "pngs", 300, corrupt=3)
    flags = ["--config.data.source=manifest", f"--config.data.path={manifest}",
             "--config.total_steps=20", "--config.checkpoint_every=20"]
    config = f"{TINY_CLIP}:retrieval"
    run = subprocess.run(_command("train", tmp_path / "run", *flags, config=config), cwd=REPO,
                         env=_ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "retrieval_val/i2t_R5" in run.stdout  # the final summary table
    assert sorted(_losses(str(tmp_path / "run"))) == list(range(1, 21))
    # 20 x 16 examples cover the whole shuffled manifest once: all 3 corrupt files skipped.
    records = metrics.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["skipped_records"] for r in records if "loss" in r][-1] == 3
    evaluation = subprocess.run(_command("evaluate", tmp_path / "run", *flags, config=config),
                                cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=300)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "eval_20.json").read_text())
    assert saved["step"] == 20 and set(saved) >= {"retrieval_val/i2t_R1", "retrieval_val/t2i_R10"}
    # The table printed by evaluate shows the same figures as the file.
    assert f"{saved['retrieval_val/i2t_R1']:.4f}" in evaluation.stdout
    # 200 images whose captions name one of 4 colours: chance R@10 is 10/200 = 0.05; a model
    # that knows the colours gets about 10/50 = 0.2 (50 identical captions tie).
    assert saved["retrieval_val/i2t_R10"] > 0.15
