"""The trainer end to end: learning happens, 1 and 8 devices agree (with and without batch
norm), the logged learning rate is the step's, a batch-norm model evaluates through the
evaluate entrypoint as it did in training, and a folder of PNG files trains and evaluates through the
command-line entrypoints. Faults (kills, signals, NaNs, bad input) are in test_faults.py."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from big_contrast import checkpoint, evaluate as evaluate_lib, metrics, train as train_lib
from big_contrast.evaluators.common import Embedder
from big_contrast.experiment import Experiment
from tests.helpers import REPO, TINY_CLIP, tiny_clip_config, write_png_manifest
from tests.labelled_data import write_labelled_set


def _losses(workdir):
    return {r["step"]: r["loss"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if "loss" in r}


def _final_params(config, workdir):
    exp = Experiment(config, jax.devices()[:1])
    ckpt = checkpoint.Checkpointer(workdir, create=False)
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


@pytest.mark.parametrize("tower", ["vit", "convnet"])
def test_one_and_eight_devices_give_the_same_losses(tmp_path, tower):
    # Batch statistics (convnet; efficientnet below) are computed over the global batch under
    # jit, so they too agree across device counts. Eight devices as 2 (data) x 2 (FSDP) x 2
    # (tensor parallel: the ViT's heads and MLPs, the ConvNet's output channels over 'model').
    config = tiny_clip_config(tower, total_steps=4, checkpoint_every=4)
    train_lib.train(config, str(tmp_path / "one"), jax.devices()[:1])
    config.mesh.update({"data": 2, "fsdp": 2, "model": 2})
    train_lib.train(config, str(tmp_path / "eight"), jax.devices())
    one, eight = _losses(str(tmp_path / "one")), _losses(str(tmp_path / "eight"))
    assert sorted(one) == [1, 2, 3, 4]
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


def test_models_are_traced_under_the_sharding_rules():
    """Linen's activation constraints ('batch', 'length', 'embed') only act under the logical
    rules: without them an FSDP train step all-reduced the ViT's activations (gigabytes per
    step for B/32, benchmarks/scaling.py) instead of gathering its parameters."""
    config = tiny_clip_config(**{"mesh.data": "2", "mesh.fsdp": "4"})
    exp = Experiment(config, jax.devices())
    abstract = exp.state_factory.abstract()
    step = exp.train_step(abstract)
    batch = exp.abstract_batch(16)
    embedder = Embedder(exp.objective, exp.mesh, 16, rules=exp.rules)
    with jax.set_mesh(exp.mesh):
        lowered_step = step.lower(abstract, batch).as_text()
        lowered_embedding = embedder.jit(exp.objective.embed_images).lower(
            abstract.params, abstract.model_state, batch["image"]).as_text()
    # Each transformer block constrains its output and its MLP's hidden activations.
    assert lowered_step.count("sharding_constraint") >= 4
    assert lowered_embedding.count("sharding_constraint") >= 2


def _command(entrypoint, workdir, *flags, config=TINY_CLIP):
    return [sys.executable, "-m", f"big_contrast.{entrypoint}", "--config", config,
            "--workdir", str(workdir), *flags]


_ENV = {**os.environ, "JAX_NUM_CPU_DEVICES": "2"}


def test_logged_learning_rate_is_the_rate_at_the_logged_step(tmp_path):
    config = tiny_clip_config(total_steps=8, log_every=4, checkpoint_every=8,
                              **{"optim.warmup_steps": "3"})
    train_lib.train(config, str(tmp_path), jax.devices()[:1])
    exp = Experiment(config, jax.devices()[:1])
    logged = {r["step"]: r["learning_rate"]
              for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))}
    # Step s applied the rate schedule(s - 1); an interval mean would differ (warmup, decay).
    for step in (4, 8):
        assert logged[step] == pytest.approx(float(exp.state_factory.schedule(step - 1)), rel=1e-6)


def test_efficientnet_on_one_and_eight_devices_agrees_and_evaluates(tmp_path):
    """Batch-norm EfficientNet: 1 device and 8 (data, FSDP and tensor parallel) agree, its
    batch statistics are checkpointed, and the evaluate entrypoint reproduces the run's own
    evaluation. (Resuming batch-norm towers bit-identically is tests/test_faults.py's, with
    the ConvNet.)"""
    # lr 1e-3: at the demo's 4e-3 these first steps of a tiny EfficientNet are chaotic enough
    # that reduction-order differences of 1e-6 grow past 1e-4 by step 5.
    config = tiny_clip_config("efficientnet,retrieval", total_steps=6, checkpoint_every=3,
                              ema_decay=0.8, **{"optim.lr": "1e-3"})
    # Eight devices as 2 (data) x 2 (FSDP) x 2 (tensor parallel): the kernels' channel axes
    # are split by their logical names.
    config.mesh.update({"data": 2, "fsdp": 2, "model": 2})
    straight = train_lib.train(config, str(tmp_path / "straight"), jax.devices())
    config.mesh.update({"data": -1, "fsdp": 1, "model": 1})
    config.evals = {}  # the one-device run only gives the losses to compare with
    train_lib.train(config, str(tmp_path / "one"), jax.devices()[:1])
    one, eight = _losses(str(tmp_path / "one")), _losses(str(tmp_path / "straight"))
    for step in range(1, 7):
        assert abs(one[step] - eight[step]) < 1e-4, (step, one[step], eight[step])
    assert jax.tree.leaves(_final_params(config, str(tmp_path / "straight")).model_state)
    evaluated = evaluate_lib.evaluate(None, str(tmp_path / "straight"), devices=jax.devices())
    for key in ("retrieval_val/i2t_R5", "ema/retrieval_val/t2i_R1"):
        assert evaluated[key] == straight[key]


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
    # 200 images whose captions name one of 4 colours, 50 identical captions each: all of them
    # count as the match, so chance R@1 is about 1/4 and a model that knows the colours gets
    # close to 1.
    assert saved["retrieval_val/i2t_R1"] > 0.5
    # Zero-shot on a labelled image folder of the same colours, with generic prompts.
    labelled = write_labelled_set(tmp_path / "labelled", per_class=10)
    zero_shot = subprocess.run(_command("evaluate", tmp_path / "run", "--zero_shot",
                                        labelled["folder"], config=f"{TINY_CLIP}:retrieval"),
                               cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=300)
    assert zero_shot.returncode == 0, zero_shot.stderr[-3000:]
    accuracy = json.loads((tmp_path / "run" / "eval_20.json").read_text())["zero_shot/top1"]
    assert accuracy >= 3 * 1 / len(labelled["classes"])
