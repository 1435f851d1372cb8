"""Faults a week-long run meets, each injected for real and each survived:

kills (at a step, during an asynchronous checkpoint write, during the final evaluation),
SIGTERM and Ctrl-C, NaN/Inf in gradients or parameters, a cut metrics line, a workdir of
another configuration, bad config values, bad manifest records, an unwritable workdir, a failed
checkpoint write, a checkpoint the code no longer matches, and evaluate on missing checkpoints.

The runs use tests/tiny_clip.py with the batch-norm ConvNet on 2 fake CPU devices; one
uninterrupted run is shared as the reference the interrupted ones must equal bit for bit.
"""

import json
import os
import signal
import subprocess

import jax
import numpy as np
import pytest

from big_contrast import checkpoint, config as bc, train as train_lib, workdir
from big_contrast.data import pipeline
from big_contrast.experiment import Experiment
from tests import runs
from tests.fault_runner import PAUSED_MARKER
from tests.helpers import (BAD_RECORDS, TINY_CLIP, read_tensorboard_scalars,
                           tiny_clip_config, write_bad_manifest)

CONFIG = f"{TINY_CLIP}:convnet,retrieval"
STEPS = 12
FLAGS = [f"--config.total_steps={STEPS}", "--config.checkpoint_every=4",
         "--config.tensorboard=true", "--config.ema_decay=0.9"]


def _run(workdir_path, *flags, config=CONFIG, **kwargs):
    return runs.run(config, workdir_path, *FLAGS, *flags, **kwargs)


def _start(workdir_path, *flags, config=CONFIG, **kwargs):
    return runs.start(config, workdir_path, *FLAGS, *flags, **kwargs)


_losses = runs.losses


def _config():
    config = tiny_clip_config("convnet,retrieval", total_steps=STEPS, ema_decay=0.9)
    return config


def _state(workdir_path):
    exp = Experiment(_config(), jax.devices()[:1])
    ckpt = checkpoint.Checkpointer(str(workdir_path), create=False)
    state = ckpt.restore(ckpt.latest_step(), exp.state_factory.abstract())
    ckpt.close()
    return jax.tree.map(np.asarray, state)


def _assert_same_run(a, b):
    """Bit-identical final loss and train state (params, optimizer, EMA, batch statistics)."""
    assert _losses(a)[STEPS] == _losses(b)[STEPS]
    for x, y in zip(jax.tree.leaves(_state(a)), jax.tree.leaves(_state(b)), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run: the reference every interrupted run must equal."""
    path = tmp_path_factory.mktemp("straight")
    run = _run(path)
    assert run.returncode == 0, run.stderr[-3000:]
    return path


def test_sigkill_at_a_step_and_a_cut_metrics_line(straight, tmp_path):
    proc = _start(tmp_path)
    runs.wait_for_step(proc, tmp_path, 6, checkpoint_step=4)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 7, "loss": 0.5')  # the line a kill cut short
    resumed = _run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from checkpoint at step 4" in resumed.stdout
    _assert_same_run(straight, tmp_path)
    assert sorted(_losses(tmp_path)) == list(range(1, STEPS + 1))
    # TensorBoard: rewritten from metrics.jsonl on resume, so no step appears twice.
    losses = [(step, value) for tag, step, value in read_tensorboard_scalars(tmp_path / "tensorboard")
              if tag == "loss"]
    assert sorted(step for step, _ in losses) == list(range(1, STEPS + 1))


def test_sigkill_while_a_checkpoint_is_being_written(straight, tmp_path):
    proc = _start(tmp_path, hook="pause_commit:8")
    runs.wait_for_line(proc, PAUSED_MARKER)  # printed once step 8's files are written
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    leftovers = os.listdir(tmp_path / "checkpoints")
    assert "4" in leftovers and "8" not in leftovers and any("tmp" in n for n in leftovers)
    resumed = _run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from checkpoint at step 4" in resumed.stdout
    _assert_same_run(straight, tmp_path)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_then_exit_nonzero_and_resume(straight, tmp_path, sig, code):
    proc = _start(tmp_path)
    runs.wait_for_step(proc, tmp_path, 2)  # ten steps before the end: the signal comes mid-run
    proc.send_signal(sig)
    proc.communicate(timeout=300)
    stderr = runs.stderr_of(proc)
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    assert f"interrupted by {sig.name} at step" in stderr and "Rerun the same command" in stderr
    stopped_at = int(stderr.split("at step ")[1].split(";")[0])
    assert checkpoint.Checkpointer(str(tmp_path), create=False).latest_step() == stopped_at
    resumed = _run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from checkpoint at step {stopped_at}" in resumed.stdout
    _assert_same_run(straight, tmp_path)


def test_kill_before_the_final_evaluation_then_rerun_a_finished_run(straight, tmp_path):
    killed = _run(tmp_path, hook="die_in_eval")
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint.Checkpointer(str(tmp_path), create=False).latest_step() == STEPS
    assert not (tmp_path / workdir.SUMMARY_FILE).exists()
    rerun = _run(tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Running the evaluations of step 12 that did not finish: retrieval_val" in rerun.stdout
    assert "First step done" not in rerun.stdout  # no training
    summary = json.loads((tmp_path / workdir.SUMMARY_FILE).read_text())
    reference = json.loads((straight / workdir.SUMMARY_FILE).read_text())
    for key in ("final_loss", "retrieval_val/i2t_R5", "ema/retrieval_val/i2t_R5"):
        assert summary[key] == reference[key], key
    # A finished run: no training, the stored summary, exit 0.
    again = _run(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "this run had already finished" in again.stdout
    assert "Resumed" not in again.stdout and "nan" not in again.stdout
    assert f"{reference['final_loss']:.4f}" in again.stdout
    assert f"{reference['ema/retrieval_val/i2t_R5']:.4f}" in again.stdout


def test_nan_and_inf_in_gradients_or_parameters_stop_before_any_bad_checkpoint(tmp_path):
    cases = {"grads": (float("nan"), "the gradients"), "params": (float("inf"), "the parameters")}
    for where, (value, named) in cases.items():
        config = _config()
        bc.apply_overrides(config, {"total_steps": "8", "log_every": "3", "checkpoint_every": "2",
                                    "evals": "{}", "debug.poison_step": "5",
                                    "debug.poison_where": where, "debug.poison_value": str(value)})
        path = tmp_path / where
        with pytest.raises(train_lib.actions.NonFiniteError) as error:
            train_lib.train(config, str(path), jax.devices()[:2])
        # Step 5 is poisoned; the check before step 6's save finds it and names it.
        assert f"step 5: {named}" in str(error.value)
        assert "last good checkpoint is step 4" in str(error.value)
        ckpt = checkpoint.Checkpointer(str(path), create=False)
        assert ckpt.all_steps() == [2, 4]
        exp = Experiment(config, jax.devices()[:1])
        for step in ckpt.all_steps():
            state = ckpt.restore(step, exp.state_factory.abstract())
            assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
        ckpt.close()


def test_a_workdir_of_another_configuration_is_refused_and_safe_changes_extend_a_run(
        straight, tmp_path):
    other = _run(straight, "--config.model.embed_dim=32", "--config.optim.lr=0.01")
    assert other.returncode == 1 and "Traceback" not in other.stderr
    assert ("holds a run of a different configuration (model.embed_dim: 16 -> 32; "
            "optim.lr: 0.004 -> 0.01)") in other.stderr
    evaluation = _run(straight, "--config.model.embed_dim=32", entrypoint="evaluate")
    assert evaluation.returncode == 1 and "model.embed_dim: 16 -> 32" in evaluation.stderr
    # A longer run, with other logging and mesh settings: accepted and listed.
    subprocess.run(["cp", "-r", str(straight), str(tmp_path / "run")], check=True)
    longer_flags = ["--config.total_steps=14", "--config.log_every=2", "--config.mesh.data=1",
                    "--config.mesh.fsdp=2"]
    killed = _run(tmp_path / "run", *longer_flags, hook="die_in_eval")
    assert killed.returncode == -signal.SIGKILL  # after step 14's checkpoint, before its evals
    assert "Config changes accepted on resume: log_every: 1 -> 2" in killed.stdout
    assert "total_steps: 12 -> 14" in killed.stdout
    longer = _run(tmp_path / "run", *longer_flags)  # not "finished" on the old run's summary
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "Running the evaluations of step 14 that did not finish" in longer.stdout
    assert sorted(_losses(tmp_path / "run"))[-2:] == [STEPS, 14]
    assert json.loads((tmp_path / "run" / workdir.SUMMARY_FILE).read_text())["step"] == 14


@pytest.mark.parametrize("key, value, message", [
    ("objective", "contrastve", "objective is 'contrastve'; did you mean 'contrastive'?"),
    ("model.image.type", "resnett", "model.image.type is 'resnett'"),
    ("optim.name", "adamw2", "optim.name is 'adamw2'; did you mean 'adamw'?"),
    ("data.source", "manifets", "data.source is 'manifets'; did you mean 'manifest'?"),
    ("evals", "{'x': {'type': 'zeroshot'}}", "evals.x.type is 'zeroshot'; did you mean 'zero_shot'?"),
    ("batch_size", "15", "batch_size 15 does not divide over the 2 batch shards"),
    ("optim.lr", "-1", "optim.lr must be > 0, got -1.0"),
    ("optim.lr", "0", "optim.lr must be > 0, got 0.0"),
    ("optim.weight_decay", "-0.1", "optim.weight_decay must be >= 0"),
    ("data.augment.crop_scale", "(0.5, 1.5)", "data.augment.crop_scale must be (low, high)"),
    ("loss.caption_weight", "-2", "loss.caption_weight must be >= 0, got -2.0"),
    ("model.decoder.queries", "0", "model.decoder.queries must be > 0, got 0"),
    ("evals", "{'c': {'type': 'captioning', 'split': 'val'}}",
     "evals.c (captioning) needs a captioning objective (e.g. coca), not Contrastive"),
])
def test_bad_config_values_are_named_before_anything_compiles(key, value, message):
    config = _config()
    bc.apply_overrides(config, {key: value})
    with pytest.raises(bc.ConfigError) as error:
        Experiment(config, jax.devices()[:2])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_config_value_on_the_command_line_is_one_line(tmp_path):
    run = _run(tmp_path, "--config.optim.lr=-1")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == "error: optim.lr must be > 0, got -1.0"
    assert "Traceback" not in run.stderr


def test_bad_manifest_records_are_skipped_and_counted_by_reason(tmp_path):
    manifest = write_bad_manifest(tmp_path / "data", good=90, bad_each=1)  # 96 records
    config = _config()
    bc.apply_overrides(config, {"data.source": "manifest", "data.path": manifest,
                                "total_steps": "12", "checkpoint_every": "12", "evals": "{}"})
    summary = train_lib.train(config, str(tmp_path / "run"), jax.devices()[:2])
    # 12 x 16 = 192 good examples: the 96-record manifest (6 bad records) is read twice and a
    # bit, so every kind of bad record was met two or three times.
    counts = {reason: summary[f"skipped/{reason}"] for reason in BAD_RECORDS}
    assert all(2 <= n <= 3 for reason, n in counts.items() if reason != "undecodable_image")
    assert 4 <= counts["undecodable_image"] <= 6  # a truncated PNG and bytes that are no image
    assert summary["skipped_records"] == sum(counts.values())


def test_a_manifest_with_too_many_corrupt_records_stops_the_run(tmp_path):
    manifest = write_bad_manifest(tmp_path / "data", good=40, bad_each=10)  # 60 % bad
    config = _config()
    bc.apply_overrides(config, {"data.source": "manifest", "data.path": manifest,
                                "total_steps": "20", "evals": "{}"})
    # The whole source (100 records) is read before the fraction is judged.
    with pytest.raises(pipeline.CorruptDataError, match=r"of the 10\d records read \(\d\d%\) "
                       r"were corrupt.*missing_file 1\d.*max_corrupt_fraction=0.1"):
        train_lib.train(config, str(tmp_path / "run"), jax.devices()[:2])


def test_an_unwritable_workdir_is_named(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(workdir.WorkdirError, match="cannot write to the workdir .*file/run"):
        train_lib.train(_config(), str(tmp_path / "file" / "run"), jax.devices()[:2])


def test_a_failed_checkpoint_write_is_named_and_the_previous_one_restores(straight, tmp_path):
    failed = _run(tmp_path, hook="fail_commit:8")
    assert failed.returncode == 1
    assert "writing the checkpoint of step 8" in failed.stderr
    assert "No space left on device" in failed.stderr
    assert "the previous checkpoint (step 4) is intact" in failed.stderr
    assert checkpoint.Checkpointer(str(tmp_path), create=False).latest_step() == 4
    resumed = _run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(straight, tmp_path)


def test_a_checkpoint_the_code_no_longer_matches_is_named(straight, tmp_path):
    subprocess.run(["cp", "-r", str(straight), str(tmp_path / "run")], check=True)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), create=False)
    config = _config()
    config.ema_decay = 0.0  # the code's state now lacks the EMA fields the checkpoint has
    exp = Experiment(config, jax.devices()[:1])
    with pytest.raises(checkpoint.CheckpointError, match=r"in the checkpoint are unknown to the "
                       r"code, e.g. ema/batch_stats"):
        ckpt.restore(STEPS, exp.state_factory.abstract())
    meta = tmp_path / "run" / "checkpoints" / str(STEPS) / "meta" / "metadata"
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "format_version": 0}))
    with pytest.raises(checkpoint.CheckpointError, match="has format version 0; this code reads "
                       f"version {checkpoint.FORMAT_VERSION}"):
        ckpt.restore(STEPS, Experiment(_config(), jax.devices()[:1]).state_factory.abstract())
    ckpt.close()


def test_evaluate_names_missing_checkpoints_and_reads_no_optimizer_state(straight, tmp_path):
    empty = _run(tmp_path, entrypoint="evaluate")
    assert empty.returncode == 1
    assert "no checkpoints in" in empty.stderr and "it has no checkpoints/ folder" in empty.stderr
    missing = _run(straight, "--step=7", entrypoint="evaluate")
    assert missing.returncode == 1
    assert "no checkpoint for step 7" in missing.stderr and "available steps: [8, 12]" in missing.stderr
    # Another optimizer has another optimizer state: evaluation works because it never reads it.
    lamb = _run(straight, "--config.optim.name=lamb", entrypoint="evaluate")
    assert lamb.returncode == 0, lamb.stderr[-3000:]
    saved = json.loads((straight / f"eval_{STEPS}.json").read_text())
    reference = json.loads((straight / workdir.SUMMARY_FILE).read_text())
    assert saved["ema/retrieval_val/i2t_R5"] == reference["ema/retrieval_val/i2t_R5"]
