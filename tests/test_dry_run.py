"""train --dry_run: per-parameter shardings and per-device bytes of the abstract train state,
checked against the shardings themselves; the command line allocates and writes nothing."""

import math
import os
import subprocess
import sys

import jax

from big_contrast import config as bc, dry_run, sharding_report
from big_contrast.experiment import Experiment
from tests import runs
from tests.helpers import REPO, TINY_CLIP, tiny_clip_config

FSDP_MESH = {"mesh.data": 2, "mesh.fsdp": 4}


def _report(config):
    exp = Experiment(config, jax.devices())
    return sharding_report.build_report(exp.state_factory.abstract(), exp.mesh), exp


def _rows(report):
    return {row.path: row for row in report.rows}


def test_fsdp_mesh_report_counts_each_shard():
    report, exp = _report(tiny_clip_config(**FSDP_MESH))
    params = exp.state_factory.abstract().params
    expected = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                   for x in jax.tree.leaves(params))
    assert report.per_device["params"] == expected
    assert report.param_bytes == 4 * report.param_count  # float32
    assert report.mesh_shape == {"data": 2, "fsdp": 4, "model": 1} and report.num_devices == 8

    rows = _rows(report)
    kernel = rows["image_tower/encoder/block_00/mlp/fc1/kernel"]
    assert kernel.spec == jax.sharding.PartitionSpec("fsdp", "model")
    assert kernel.bytes == 32 * 128 * 4 and kernel.bytes_per_device == kernel.bytes // 4
    bias = rows["image_tower/encoder/block_00/mlp/fc1/bias"]  # 'mlp' -> 'model', of size 1
    assert "fsdp" not in bias.spec and bias.bytes_per_device == bias.bytes == 128 * 4

    # AdamW: two moments sharded like the parameters, plus replicated step counts.
    per_device = report.per_device
    assert 2 * per_device["params"] <= per_device["opt_state"] <= 2 * per_device["params"] + 64
    assert "ema" not in per_device and per_device["model_state"] == 0
    step_and_rng = 4 + 8
    assert per_device["total"] == (per_device["params"] + per_device["opt_state"]
                                   + step_and_rng)

    text = sharding_report.format_report(report)
    assert "Mesh {'data': 2, 'fsdp': 4, 'model': 1}: 8 device(s)" in text
    assert f"Parameters: {report.param_count:,}" in text


def test_convnet_kernels_are_split_by_their_channel_names():
    """The demo's ConvNet names its channels: FSDP splits inputs, tensor parallelism outputs
    (its first convolution's three input channels stay whole)."""
    report, _ = _report(tiny_clip_config("convnet", **{"mesh.data": 2, "mesh.fsdp": 2,
                                                       "mesh.model": 2}))
    rows = _rows(report)
    first, second = rows["image_tower/stage0_conv0/kernel"], rows["image_tower/stage1_conv0/kernel"]
    assert first.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert first.bytes_per_device == first.bytes // 2
    assert second.spec == jax.sharding.PartitionSpec(None, None, "fsdp", "model")
    assert second.bytes_per_device == second.bytes // 4


def test_report_counts_batch_statistics_and_the_ema():
    report, _ = _report(tiny_clip_config("convnet", ema_decay=0.9))
    per_device = report.per_device
    assert per_device["model_state"] > 0
    # The EMA averages the parameters and the batch statistics (all of this model state).
    assert per_device["ema"] == per_device["params"] + per_device["model_state"]


def test_paper_recipe_dry_run_stands_in_for_its_missing_tokenizer():
    config = bc.load_config_file(os.path.join(REPO, "configs", "clip.py:B/32"))
    bc.apply_overrides(config, {k: str(v) for k, v in FSDP_MESH.items()})
    text = dry_run.report(config, devices=jax.devices())
    assert config.text.tokenizer == "sentencepiece"  # the caller's config is left alone
    assert "Note: text.tokenizer 'sentencepiece' cannot be built here" in text
    embedding = next(line for line in text.splitlines()
                     if line.startswith("text_tower/token_embed/embedding"))
    assert "(49408, 512)" in embedding and "('vocab', 'embed')" in embedding
    assert "P('model', 'fsdp')" in embedding and embedding.endswith("24.12 MiB")
    assert "Parameters: 151,278,081 (577.08 MiB), 144.58 MiB per device" in text
    assert "Training length: 390,625 steps of 32,768 (2,000 warmup)" in text


def test_epoch_length_of_a_source_that_cannot_be_opened_is_unknown(tmp_path):
    config = tiny_clip_config(**{"data.source": "manifest", "optim.warmup_steps": 0,
                                 "data.path": str(tmp_path / "{split}.csv")})
    config.total_steps, config.total_epochs = None, 2.0
    text = dry_run.report(config, devices=jax.devices())
    assert "Training length: unknown, the training source cannot be opened " \
           "(FileNotFoundError: " in text
    assert "Parameters: " in text


def test_command_line_dry_run_prints_the_table_and_writes_nothing(tmp_path):
    env = {**runs.ENV, "JAX_NUM_CPU_DEVICES": "8"}
    mesh = [f"--config.{k}={v}" for k, v in FSDP_MESH.items()]
    workdir = tmp_path / "run"
    proc = subprocess.run(runs.command(TINY_CLIP, workdir, "--dry_run", *mesh), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "parameter" in proc.stdout and "logical axes" in proc.stdout
    assert "P('fsdp', 'model')" in proc.stdout
    assert "Mesh {'data': 2, 'fsdp': 4, 'model': 1}: 8 device(s)" in proc.stdout
    assert not workdir.exists() and os.listdir(tmp_path) == []

    # --workdir is optional; a mesh the devices do not fill is a one-line error.
    no_workdir = [sys.executable, "-m", "big_contrast.train", "--config", TINY_CLIP,
                  "--dry_run", "--config.mesh.fsdp=3"]
    proc = subprocess.run(no_workdir, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: mesh ")
