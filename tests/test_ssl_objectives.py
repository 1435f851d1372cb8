"""SwAV and SimCLR through the real train step: prototype freezing, the queue, global-batch
losses sharded over 8 devices equal to one device, the starting SwAV loss, checkpoints, and a
SwAV run that resumes bit-identically after SIGKILL."""

import json
import math
import os
import re
import signal

import jax
import numpy as np
import pytest

from big_contrast import checkpoint, config as bc, evaluate as evaluate_lib
from big_contrast.data import pipeline
from big_contrast.experiment import Experiment
from tests import runs
from tests.helpers import REPO

TINY_SSL = "tests/tiny_ssl.py"


def _config(arg: str, **overrides):
    config = bc.load_config_file(os.path.join(REPO, f"{TINY_SSL}:{arg}"))
    return bc.apply_overrides(config, {k: str(v) for k, v in overrides.items()})


def _host_batches(config, n: int) -> list[dict]:
    """The first n global batches of the config's training stream, as numpy arrays."""
    exp = Experiment(config, jax.devices()[:1])
    data = pipeline.TrainBatches(config.data, exp.objective.batch_spec, exp.tokenizer,
                                 config.batch_size, config.seed, exp.mesh)
    try:
        return [jax.tree.map(np.asarray, next(data)) for _ in range(n)]
    finally:
        data.close()


def _train(config, devices, batches):
    """Runs the train step over the batches; returns (states after each step, metrics)."""
    exp = Experiment(config, devices)
    abstract = exp.state_factory.abstract()
    step = exp.train_step(abstract)
    state = exp.state_factory.create()
    states, history = [jax.tree.map(np.asarray, state)], []
    with jax.set_mesh(exp.mesh):
        for batch in batches:
            batch = {k: jax.device_put(v, jax.sharding.NamedSharding(
                exp.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))) for k, v in batch.items()}
            state, values = step(state, batch)
            states.append(jax.tree.map(np.asarray, state))
            history.append(jax.tree.map(float, values))
    return states, history


@pytest.fixture(scope="module")
def swav_run():
    config = _config("swav")
    batches = _host_batches(config, 6)
    return config, batches, _train(config, jax.devices()[:1], batches)


def test_prototypes_stay_frozen_and_their_moments_stay_zero_until_the_window_ends(swav_run):
    config, _, (states, _) = swav_run
    frozen = config.swav.freeze_prototypes_steps
    initial = states[0].params["prototypes"]
    np.testing.assert_allclose(np.linalg.norm(initial, axis=1), 1.0, rtol=1e-6)
    for state in states[1:frozen + 1]:
        np.testing.assert_allclose(state.params["prototypes"], initial, atol=1e-6)
        moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
                   if "prototypes" in jax.tree_util.keystr(path) and leaf.shape == initial.shape]
        assert moments and all(np.all(m == 0) for m in moments)
    head = [s.params["head"]["out"]["kernel"] for s in (states[0], states[frozen])]
    assert np.abs(head[1] - head[0]).max() > 1e-4  # the rest trained meanwhile
    moved = states[frozen + 1].params["prototypes"]
    assert np.abs(moved - initial).max() > 1e-4
    np.testing.assert_allclose(np.linalg.norm(moved, axis=1), 1.0, rtol=1e-5)


def test_the_queue_fills_from_its_start_step_and_is_used_once_full(swav_run):
    config, _, (states, history) = swav_run
    batch, length = config.batch_size, config.swav.queue_length
    # Pushed from optimizer step 1 on (the second step); two batches fill it.
    filled = [int(s.model_state["queue"]["filled"]) for s in states]
    assert filled == [0, 0, batch, 2 * batch, length, length, length]
    assert [m["queue_in_use"] for m in history] == [0, 0, 0, 1, 1, 1]
    for before, after in zip(states[3:], states[4:]):  # newest rows in front, oldest dropped
        np.testing.assert_array_equal(after.model_state["queue"]["embeddings"][:, batch:],
                                      before.model_state["queue"]["embeddings"][:, :length - batch])


def test_swav_loss_starts_near_log_k_at_the_paper_embedding_width(swav_run):
    """With 128-d embeddings (the paper's), random prototypes score every crop about alike,
    so the first loss is near ln K, as SwAV's logs start at ln 3000."""
    config, batches, (_, history) = swav_run
    assert all(np.isfinite(m["loss"]) for m in history)
    config = _config("swav", **{"model.embed_dim": 128, "model.num_prototypes": 256,
                                "swav.queue_length": 0})
    exp = Experiment(config, jax.devices()[:1])
    params, model_state = exp.state_factory.initial_weights()
    with jax.set_mesh(exp.mesh):
        loss, _ = jax.jit(exp.objective.loss_fn)(params, model_state, batches[0],
                                                 jax.random.key(0), 0)
    assert abs(float(loss) - math.log(256)) < 0.15 * math.log(256), float(loss)


def test_swav_on_eight_devices_equals_one_device(swav_run):
    """Eight devices as 2 (data) x 2 (FSDP) x 2 (tensor parallel): the ResNet's kernels are
    split by their logical channel names, Sinkhorn reduces over the batch axes."""
    # lr 5e-4 (the tiny recipe's 2e-3 is chaotic here: Adam's first steps move a weight by
    # about lr x sign(gradient), so gradients at the rounding level go either way, and
    # Sinkhorn's exp(score / 0.05) amplifies the difference: 8e-5 apart by step 6).
    _, batches, _ = swav_run
    config = _config("swav", **{"optim.lr": "5e-4"})
    states, history = _train(config, jax.devices()[:1], batches)
    config.mesh.update({"data": 2, "fsdp": 2, "model": 2})
    sharded_states, sharded_history = _train(config, jax.devices()[:8], batches)
    np.testing.assert_allclose([m["loss"] for m in sharded_history],
                               [m["loss"] for m in history], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(sharded_states[-1]), jax.tree.leaves(states[-1]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=2e-5)


@pytest.mark.parametrize("arg", ["simclr", "simclr,mochi"])
def test_simclr_on_eight_devices_equals_one_device(arg):
    """Without mixing the global NT-Xent is the same on any mesh (here 2 (data) x 2 (FSDP) x 2
    (tensor parallel)); MoCHi's draws are per device, so with it the loss must be finite on
    both."""
    config = _config(arg, total_steps=3)
    batches = _host_batches(config, 3)
    _, single = _train(config, jax.devices()[:1], batches)
    config = config.copy_and_resolve_references()
    config.mesh.update({"data": 2, "fsdp": 2, "model": 2})
    _, sharded = _train(config, jax.devices()[:8], batches)
    if "mochi" in arg:
        assert all(np.isfinite(m["loss"]) for m in single + sharded)
    else:
        np.testing.assert_allclose([m["loss"] for m in sharded], [m["loss"] for m in single],
                                   rtol=2e-5)


def test_the_queue_survives_a_checkpoint_round_trip(swav_run, tmp_path):
    config, _, (states, _) = swav_run
    exp = Experiment(config, jax.devices()[:1])
    abstract = exp.state_factory.abstract()
    state = jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), states[4], abstract)
    ckpt = checkpoint.Checkpointer(str(tmp_path), 2)
    ckpt.save(4, state)
    ckpt.wait()
    restored = ckpt.restore(4, abstract)
    ckpt.close()
    for key in ("embeddings", "filled"):
        np.testing.assert_array_equal(restored.model_state["queue"][key],
                                      states[4].model_state["queue"][key])


def test_a_swav_run_resumes_bit_identically_after_sigkill_and_evaluates(tmp_path):
    """SIGKILL after the step-4 checkpoint: the rerun ends bit-identical (queue included), and
    the evaluate entrypoint reproduces the run's kNN and linear-probe results."""
    config, flags = f"{TINY_SSL}:swav,evals", ["--config.total_steps=8",
                                               "--config.checkpoint_every=4"]
    # The uninterrupted run needs no evaluators: only its losses and state are compared.
    straight = runs.run(f"{TINY_SSL}:swav", tmp_path / "straight", *flags)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = runs.start(config, killed, *flags)
    runs.wait_for_step(proc, killed, 5, checkpoint_step=4)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    resumed = runs.run(config, killed, *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from checkpoint at step 4" in resumed.stdout
    assert runs.losses(killed)[8] == runs.losses(tmp_path / "straight")[8]
    exp = Experiment(_config("swav,evals", total_steps=8), jax.devices()[:1])
    trees = []
    for path in (tmp_path / "straight", killed):
        ckpt = checkpoint.Checkpointer(str(path), create=False)
        trees.append(jax.tree.map(np.asarray, ckpt.restore(8, exp.state_factory.abstract())))
        ckpt.close()
    for x, y in zip(*map(jax.tree.leaves, trees), strict=True):
        np.testing.assert_array_equal(x, y)
    summary = json.loads((killed / "summary.json").read_text())
    evaluated = evaluate_lib.evaluate(None, str(killed), devices=jax.devices()[:2])
    for key in ("knn/val/top1", "knn/val/random_init_top1", "linear_probe/val/top1",
                "linear_probe/val/random_init_top1"):
        assert 0 <= summary[key] <= 1 and evaluated[key] == summary[key], key


@pytest.mark.parametrize("arg, key, value, message", [
    ("swav", "swav.queue_length", "40", "swav.queue_length must be a multiple of batch_size (16)"),
    ("swav", "model.num_prototypes", "16", "model.num_prototypes must be > model.embed_dim (16)"),
    ("swav", "swav.assign_crops", "3", "swav.assign_crops must be between 1 and "
                                       "data.multicrop.global_crops (2)"),
    ("simclr", "data.multicrop.global_crops", "3", "must be 2 for simclr"),
    ("simclr", "simclr.loss", "dlc", "simclr.loss is 'dlc'; did you mean 'dcl'?"),
    ("simclr", "data.augment.hue_jitter", "0.7", "data.augment.hue_jitter must be in [0, 0.5]"),
    ("simclr", "evals", "{'z': {'type': 'zero_shot', 'split': 'val'}}",
     "evals.z (zero_shot) compares images with text, but SimCLR is image-only"),
])
def test_bad_image_only_settings_are_named_before_anything_is_built(arg, key, value, message):
    config = _config(arg)
    with pytest.raises(bc.ConfigError, match=re.escape(message)):
        Experiment(bc.apply_overrides(config, {key: value}), jax.devices()[:1])
