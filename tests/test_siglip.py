"""SigLIP wiring: the recipe's initial logit scale and bias, the sigmoid loss through the
objective equals losses.sigmoid_contrastive, and the config refuses what it cannot train."""

import jax
import numpy as np
import pytest

from big_contrast import config as bc, losses, train as train_lib
from big_contrast.experiment import Experiment
from tests import runs
from tests.helpers import REPO, tiny_clip_config

SIGMOID = {"loss.contrastive": "sigmoid", "model.init_bias": "-10", "model.init_scale": "10"}


def test_demo_recipe_starts_at_the_papers_scale_and_bias():
    config = bc.load_config_file(f"{REPO}/configs/siglip.py:demo")
    assert config.loss.contrastive == "sigmoid"
    assert (config.model.init_scale, config.model.init_bias) == (10.0, -10.0)


def test_objective_loss_is_the_sigmoid_loss_of_its_embeddings():
    exp = Experiment(tiny_clip_config(**SIGMOID), jax.devices()[:1])
    state = exp.state_factory.create()
    assert float(state.params["bias"]) == -10.0
    assert float(np.exp(state.params["log_scale"])) == pytest.approx(10.0)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
             "text": exp.tokenizer.encode_batch([f"a red circle {i}" for i in range(16)])}
    objective = exp.objective
    with jax.set_mesh(exp.mesh):
        loss, (metrics, _) = objective.loss_fn(state.params, state.model_state, batch,
                                               jax.random.PRNGKey(0), state.step)
        outputs, _ = objective.per_example_outputs(state.params, state.model_state, batch,
                                                   jax.random.PRNGKey(0), state.step)
    expected = losses.sigmoid_contrastive(outputs["image"], outputs["text"], 10.0, -10.0)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert float(metrics["bias"]) == -10.0


def test_sigmoid_loss_trains_alike_on_one_device_and_on_data_fsdp_and_tensor_parallel(tmp_path):
    """Eight devices as 2 (data) x 2 (FSDP) x 2 (tensor parallel): the ring loss runs over the
    batch axes while the towers are split over 'model'."""
    config = tiny_clip_config(total_steps=3, checkpoint_every=3, **SIGMOID)
    train_lib.train(config, str(tmp_path / "one"), jax.devices()[:1])
    config.mesh.update({"data": 2, "fsdp": 2, "model": 2})
    train_lib.train(config, str(tmp_path / "eight"), jax.devices())
    one, eight = runs.losses(tmp_path / "one"), runs.losses(tmp_path / "eight")
    assert sorted(one) == sorted(eight) == [1, 2, 3]
    for step in one:
        assert abs(one[step] - eight[step]) < 1e-4 * abs(one[step]), (step, one[step], eight[step])


def test_sigmoid_loss_needs_a_bias_and_the_contrastive_objective():
    with pytest.raises(bc.ConfigError, match="model.init_bias"):
        Experiment(tiny_clip_config(**{"loss.contrastive": "sigmoid"}), jax.devices()[:1])
    coca = bc.load_config_file(f"{REPO}/tests/tiny_coca.py")
    bc.apply_overrides(coca, {"loss.contrastive": "sigmoid", "model.init_bias": "-10"})
    with pytest.raises(bc.ConfigError, match="'contrastive' objective, not 'coca'"):
        Experiment(coca, jax.devices()[:1])


def test_block_size_is_refused_for_the_sigmoid_loss():
    with pytest.raises(bc.ConfigError, match="loss.block_size is for the softmax loss"):
        Experiment(tiny_clip_config(**SIGMOID, **{"loss.block_size": "4"}), jax.devices()[:1])
