"""Paper-scale recipes build and shape-check on CPU with jax.eval_shape: model, optimizer
state and shardings, without allocating a single parameter."""

import os

import jax

from big_contrast import config as bc
from big_contrast.data.tokenizers import VocabularyTokenizer
from big_contrast.experiment import Experiment
from tests.helpers import REPO, parameter_count


def _abstract_state(recipe, examples_per_epoch=None, **overrides):
    config = bc.load_config_file(os.path.join(REPO, "configs", recipe))
    # Same vocabulary size as the paper's tokenizer, without needing its model file here.
    bc.apply_overrides(config, {"text.tokenizer": "words", **overrides})
    exp = Experiment(config, jax.devices(), examples_per_epoch=examples_per_epoch)
    return config, exp, exp.state_factory.abstract()


def test_clip_b32_recipe_shape_checks_with_clip_parameter_count():
    config, exp, state = _abstract_state("clip.py:B/32")
    assert config.batch_size == 32_768 and exp.batch_feed.local_size == 32_768
    # OpenAI's ViT-B/32 CLIP has 151,277,313 parameters; ours adds the patch-embedding bias
    # (768) that OpenAI's conv1 lacks.
    assert parameter_count(state.params) == 151_277_313 + 768
    # AdamW keeps two moments per parameter.
    assert parameter_count(state.opt_state) >= 2 * parameter_count(state.params)
    assert exp.total_steps == 390_625  # 32 epochs of 400M pairs


def test_align_l2_recipe_shape_checks():
    config, exp, state = _abstract_state("align.py:L2")
    params = state.params
    assert config.batch_size == 16_384 and exp.total_steps == 1_200_000
    image_tower = parameter_count(params["image_tower"])
    text_tower = parameter_count(params["text_tower"])
    # EfficientNet-L2 is ~480M parameters (Xie et al. 2020) and BERT-Large's encoder ~300M
    # (its 30k-wordpiece embedding is swapped here for ALIGN's 100k vocabulary).
    assert 450e6 < image_tower < 490e6, image_tower
    assert 380e6 < text_tower < 420e6, text_tower
    assert params["image_proj"]["proj"]["kernel"].shape[1] == 640
    assert params["text_proj"]["proj"]["kernel"].shape == (1024, 640)


def test_fsdp_mesh_shards_the_paper_recipe_parameters():
    _, exp, state = _abstract_state("clip.py:B/32", **{"mesh.data": "2", "mesh.fsdp": "4"})
    kernel = state.params["text_tower"]["token_embed"]["embedding"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("model", "fsdp")
    assert dict(exp.mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}


def test_coca_base_recipe_shape_checks_near_the_paper_parameter_count(tmp_path):
    # A 64k-word vocabulary file stands in for the recipe's 64k SentencePiece model.
    vocabulary = tmp_path / "vocab.json"
    VocabularyTokenizer([f"w{i}" for i in range(64_000 - 4)]).save(str(vocabulary))
    config, exp, state = _abstract_state("coca.py:B", **{
        "text.tokenizer": "vocab", "text.model_path": str(vocabulary)})
    params = state.params
    assert config.batch_size == 65_536 and exp.total_steps == 500_000
    assert exp.warmup_steps == 10_000 and config.optim.name == "adafactor"
    image = parameter_count(params["image_tower"])
    decoder = parameter_count(params) - image
    # CoCa-Base (Yu et al. 2022, Table 1): 86M image encoder, 297M text decoder, 383M total.
    assert 85e6 < image < 88e6, image
    assert 0.9 * 297e6 < decoder < 1.15 * 297e6, decoder
    assert params["decoder_pooler"]["queries"].shape == (256, 768)
    assert len([k for k in params if k.startswith("multimodal_")]) == 12
    assert len([k for k in params if k.startswith("unimodal_")]) == 12
    # Adafactor: momentum (one copy) + factored second moments. Attention kernels stored per
    # head ([768, 12, 3, 64]) have a second-largest dimension under optax's 128 and keep full
    # second moments, so the state is ~1.3x the parameters, against Adam's 2x.
    assert 1.0 < parameter_count(state.opt_state) / parameter_count(state.params) < 1.4


IMAGENET_TRAIN = 1_281_167  # imagenet2012's train split


def test_swav_800ep_recipe_shape_checks_with_swav_resnet50_parameter_count():
    config, exp, state = _abstract_state("swav.py:800ep", IMAGENET_TRAIN)
    params = state.params
    assert config.batch_size == 4096 and config.optim.name == "lars"
    assert exp.total_steps == round(800 * IMAGENET_TRAIN / 4096)
    assert exp.warmup_steps == round(10 * IMAGENET_TRAIN / 4096)
    assert exp.objective.batch_spec.image_groups()[0][1:] == (224, 2)
    assert exp.objective.batch_spec.image_groups()[1][1:] == (96, 6)
    # ResNet-50 without its classifier (torchvision: 25,557,032 - 2,049,000) ...
    assert parameter_count(params["image_tower"]) == 23_508_032
    # ... the 2048-2048-128 head (its hidden layer bias-free: batch norm follows; SwAV's
    # nn.Linear keeps a redundant bias of 2,048) and 3,000 x 128 prototypes.
    assert parameter_count(params["head"]) == 2048 * 2048 + 2 * 2048 + 2048 * 128 + 128
    assert params["prototypes"].shape == (3000, 128)
    # LARS keeps one momentum per parameter (the frozen prototypes' in their own group's
    # state), plus step counters.
    assert parameter_count(params) <= parameter_count(state.opt_state) <= parameter_count(params) + 10


def test_simclr_v1_recipe_shape_checks():
    config, exp, state = _abstract_state("simclr.py:v1", IMAGENET_TRAIN)
    assert config.batch_size == 4096 and config.optim.lr == 4.8 == 0.3 * 4096 / 256
    assert exp.total_steps == round(100 * IMAGENET_TRAIN / 4096)
    assert parameter_count(state.params["image_tower"]) == 23_508_032
    assert state.params["head"]["out"]["kernel"].shape == (2048, 128)
    assert "prototypes" not in state.params


def test_siglip_b16_recipe_shape_checks():
    config, exp, state = _abstract_state("siglip.py:B/16")
    params = state.params
    assert config.batch_size == 32_768 and config.data.image_size == 256
    assert exp.total_steps == 1_220_703  # 40B examples of 32,768
    # ViT-B/16 at 256 px (256 patches): ~86M; a B-sized text transformer with a 32k vocabulary
    # and 64 positions: ~110M. The sigmoid loss's scale and bias are scalars.
    assert 85e6 < parameter_count(params["image_tower"]) < 88e6, parameter_count(params["image_tower"])
    assert 108e6 < parameter_count(params["text_tower"]) < 112e6, parameter_count(params["text_tower"])
    assert params["bias"].shape == () and params["log_scale"].shape == ()
