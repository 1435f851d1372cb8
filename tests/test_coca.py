"""CoCa: the model's information flow (the unimodal text embedding never sees the image, the
decoder is causal), cached decoding equals uncached decoding, the generative scorer learns,
one and eight devices agree, a SIGKILLed run resumes bit-identically, and the captioning
evaluators run through the evaluate entrypoint."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from big_contrast import checkpoint, config as bc, decoding, metrics, train as train_lib
from big_contrast.experiment import Experiment
from tests import runs
from tests.helpers import REPO

TINY_COCA = "tests/tiny_coca.py"


def _config(arg="", **overrides):
    config = bc.load_config_file(os.path.join(REPO, f"{TINY_COCA}:{arg}"))
    return bc.apply_overrides(config, {k: str(v) for k, v in overrides.items()})


@pytest.fixture(scope="module")
def tiny():
    """(objective, params, model_state, images [4], tokenised captions [4]) at initialisation."""
    exp = Experiment(_config(), jax.devices()[:1])
    state = exp.state_factory.create()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    tokens = exp.tokenizer.encode_batch(["a red circle", "a big blue star in the centre",
                                         "a small green square", "two shapes"])
    return exp, state.params, state.model_state, images, tokens


def test_unimodal_text_embedding_does_not_depend_on_the_image(tiny):
    exp, params, model_state, images, tokens = tiny
    model = exp.objective.model

    def text_embedding(pixels):
        out = model.apply({"params": params, **model_state}, pixels, tokens)
        return out["text"].sum()

    pixels = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    gradient = jax.grad(text_embedding)(pixels)
    assert np.all(np.asarray(gradient) == 0.0)
    # ... while the captioning logits do depend on it.
    logits = jax.grad(lambda p: model.apply({"params": params, **model_state}, p,
                                            tokens)["logits"].sum())(pixels)
    assert np.abs(np.asarray(logits)).max() > 0


def test_multimodal_logits_at_t_ignore_the_tokens_after_t(tiny):
    exp, params, model_state, images, tokens = tiny
    model = exp.objective.model
    base = model.apply({"params": params, **model_state}, images, tokens)["logits"]
    for t in (1, 3, 5):
        changed = tokens.copy()
        changed[:, t + 1:] = np.where(changed[:, t + 1:] == 0, 0, 7)  # other real tokens
        logits = model.apply({"params": params, **model_state}, images, changed)["logits"]
        np.testing.assert_allclose(np.asarray(logits[:, : t + 1]), np.asarray(base[:, : t + 1]),
                                   atol=1e-5)
        assert np.abs(np.asarray(logits[:, t + 1:] - base[:, t + 1:])).max() > 1e-4


def test_cached_decoding_equals_uncached_decoding_token_for_token(tiny):
    exp, params, model_state, images, _ = tiny
    objective, tokenizer = exp.objective, exp.tokenizer
    ids = dict(batch_size=len(images), max_len=tokenizer.max_len, bos_id=tokenizer.bos_id,
               eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)

    def cached(images):
        cache = objective.init_decoding(params, model_state, images)
        step = lambda c, token, pos: objective.decode_step(params, model_state, c, token, pos)
        return decoding.greedy_decode(step, cache, **ids)

    def uncached(images):
        """Reruns the whole model on the prefix at every step: its 'cache' is the prefix."""
        def step(prefix, token, pos):
            prefix = prefix.at[:, pos].set(token)
            logits = objective.model.apply({"params": params, **model_state}, images,
                                           prefix)["logits"]
            step_logits = jnp.take(logits, pos, axis=1)
            return objective.mask_special_tokens(jax.nn.log_softmax(step_logits)), prefix

        return decoding.greedy_decode(step, jnp.zeros((len(images), ids["max_len"]), jnp.int32),
                                      **ids)

    fast, fast_score = jax.jit(cached)(images)
    slow, slow_score = jax.jit(uncached)(images)
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(slow))
    np.testing.assert_allclose(np.asarray(fast_score), np.asarray(slow_score), rtol=1e-4)
    # A random model does not stop early: the comparison covers every position.
    assert (np.asarray(fast)[:, 1:] != tokenizer.pad_id).sum() > len(images) * 4


def test_generative_scorer_ranks_trained_captions_above_wrong_ones(tiny):
    """After a few steps on a world of four (image, caption) pairs, each image's own caption
    has the highest log-likelihood among the four."""
    exp, params, model_state, images, tokens = tiny
    objective = exp.objective
    optimizer = optax.adam(3e-3)
    batch = {"image": images, "text": tokens}

    @jax.jit
    def step(params, opt_state, model_state):
        grads, (_, model_state) = jax.grad(objective.loss_fn, has_aux=True)(
            params, model_state, batch, jax.random.key(0), 0)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, model_state

    opt_state = optimizer.init(params)
    with jax.set_mesh(exp.mesh):  # the contrastive term gathers over the mesh's batch axes
        before = np.asarray(objective.score_captions(params, model_state, images, tokens))
        for _ in range(60):
            params, opt_state, model_state = step(params, opt_state, model_state)
        scores = np.asarray(objective.score_captions(params, model_state, images, tokens))
    assert (np.argmax(scores, axis=1) == np.arange(4)).all(), scores
    assert np.diag(scores).mean() > np.diag(before).mean() + 5.0


def test_a_tokenizer_that_cannot_decode_is_refused():
    with pytest.raises(bc.ConfigError, match="cannot decode; set text.tokenizer"):
        Experiment(_config(**{"text.tokenizer": "words"}), jax.devices()[:1])


def test_one_and_eight_devices_give_the_same_losses(tmp_path):
    """Eight devices as 2 (data) x 2 (FSDP) x 2 (tensor parallel over 'model')."""
    config = _config(total_steps=3, checkpoint_every=3)
    one = train_lib.train(config, str(tmp_path / "one"), jax.devices()[:1])
    config.mesh.update({"data": 2, "fsdp": 2, "model": 2})
    # The word-list tokenizer's 105 ids do not split in two: the vocabulary stays whole (a
    # mesh that cannot divide it is a ConfigError naming the token embedding).
    config.sharding_rules = [r if r[0] != "vocab" else ["vocab", None]
                             for r in config.sharding_rules]
    train_lib.train(config, str(tmp_path / "eight"), jax.devices())
    a, b = runs.losses(tmp_path / "one"), runs.losses(tmp_path / "eight")
    assert sorted(a) == [1, 2, 3] and one["final_loss"] == a[3]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
    # Both terms are logged.
    record = [r for r in metrics.read_jsonl(str(tmp_path / "eight" / "metrics.jsonl"))
              if r["step"] == 3][0]
    assert {"contrastive_loss", "caption_loss"} <= set(record)
    np.testing.assert_allclose(record["loss"], record["contrastive_loss"]
                               + 2.0 * record["caption_loss"], rtol=1e-5)


def test_sigkill_resumes_bit_identically_and_evaluate_reports_captions(tmp_path):
    config = TINY_COCA  # training without evaluators; evaluate runs the captioning ones
    flags = ["--config.total_steps=8", "--config.checkpoint_every=2"]
    straight = runs.run(config, tmp_path / "straight", *flags)
    assert straight.returncode == 0, straight.stderr[-3000:]
    proc = runs.start(config, tmp_path / "killed", *flags)
    runs.wait_for_step(proc, tmp_path / "killed", 5, checkpoint_step=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = runs.run(config, tmp_path / "killed", *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from checkpoint" in resumed.stdout
    assert runs.losses(tmp_path / "straight")[8] == runs.losses(tmp_path / "killed")[8]
    exp = Experiment(_config("captioning"), jax.devices()[:1])
    states = [_restore(exp, tmp_path / name) for name in ("straight", "killed")]
    for x, y in zip(*map(jax.tree.leaves, states), strict=True):
        np.testing.assert_array_equal(x, y)
    # The run stored its vocabulary; evaluate decodes captions with it and prints samples.
    assert os.path.isfile(tmp_path / "straight" / "vocabulary.json")
    evaluated = runs.run(f"{TINY_COCA}:captioning", tmp_path / "straight", entrypoint="evaluate")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "captioning_val/cider" in evaluated.stdout
    assert "generative_val/top1" in evaluated.stdout
    assert "(reference: " in evaluated.stdout


def _restore(exp, workdir):
    ckpt = checkpoint.Checkpointer(str(workdir), create=False)
    state = ckpt.restore(ckpt.latest_step(), exp.state_factory.abstract())
    ckpt.close()
    return jax.tree.map(np.asarray, state)
