"""SwAV (Caron et al. 2020): multi-crop views, online Sinkhorn codes over prototypes, swapped
prediction. Image only: no captions, no text tower.

Variants (the text after ':' in --config):
  demo  a small CIFAR-style ResNet on the synthetic world of centred shapes on plain
        backgrounds (recipe_parts.shape_world) with 2 x 32 px crops of 70-100 % of the image
        and hard codes; trains and evaluates (kNN and linear probe on shape) on a 2-core CPU
        in about 6 minutes (README, "Image-only self-supervision": measured figures on two
        seeds, random-init rows beside, and what the demo changes from the paper and why).
  800ep the paper's headline recipe (75.3% linear top-1): ResNet-50, global batch 4,096,
        3,000 prototypes, 2 x 224 + 6 x 96 crops, 800 epochs of imagenet2012 read through TFDS,
        LARS (lr 4.8, final lr 0.0048, weight decay 1e-6, trust coefficient 0.001) on every
        parameter, 10 warmup epochs then cosine, prototypes frozen for the first 313 steps,
        no queue. Point data.path at your TFDS data_dir.
Options after the variant: e.g. 'demo,bs=128'.

Deviation from the paper recipe: its warmup starts at lr 0.3; ours starts at 0.
"""

from big_contrast import config as bc, recipe_parts


def get_config(arg=None):
    return bc.build_recipe(arg, "swav", {"demo": _demo, "800ep": _paper}, shared=_swav)


def _swav(c):
    """What every SwAV variant shares: the official repository's defaults."""
    recipe_parts.ssl_augmentation_and_lars(c)
    c.objective = "swav"
    c.loss.temperature = 0.1
    c.swav.epsilon = 0.05
    c.swav.sinkhorn_iterations = 3
    c.swav.assign_crops = 2
    c.optim.exclude_groups = []  # SwAV's LARC covers every parameter, biases and norms too


def _demo(c):
    recipe_parts.image_only_demo(c)
    c.total_steps = 800
    c.checkpoint_every = 400
    c.optim.lr = 8e-3
    c.optim.exclude_groups = ["vectors"]
    c.model.embed_dim = 64
    c.model.num_prototypes = 128  # more than embed_dim (validation.py says why)
    c.swav.freeze_prototypes_steps = 50
    # With soft codes this small run collapses (the codes flatten to 1/K and the embeddings
    # gather); rounding them to one-hot, as SwAV's README suggests for a loss stuck at ln K,
    # lets it learn shape.
    c.swav.hard_assignment = True
    # Crops of at least 70 % of the image keep the centred shape whole in both views. Four
    # 16 px crops of 15-40 % (local_crops=4 turns them on) gave the same probes for more
    # compute (README), so the demo trains on the two views.
    c.data.multicrop.global_scale = (0.7, 1.0)
    c.data.multicrop.local_crops = 0
    c.data.multicrop.local_size = 16
    c.data.multicrop.local_scale = (0.15, 0.4)


def _paper(c):
    recipe_parts.imagenet_resnet50(c)
    c.total_epochs = 800.0
    c.optim.end_lr_fraction = 0.001  # final lr 0.0048
    c.model.num_prototypes = 3000
    c.swav.freeze_prototypes_steps = 313
    c.swav.queue_length = 0
    c.data.multicrop.global_scale = (0.14, 1.0)
    c.data.multicrop.local_crops = 6
    c.data.multicrop.local_size = 96
    c.data.multicrop.local_scale = (0.05, 0.14)
