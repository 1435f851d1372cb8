"""SimCLR (Chen et al. 2020): two strongly augmented views per image, NT-Xent over the global
batch. Image only: no captions, no text tower. simclr.loss='dcl' trains DCL instead, and
simclr.hard_negatives.top_n > 0 adds MoCHi's synthetic hard negatives.

Variants (the text after ':' in --config):
  demo  a small CIFAR-style ResNet on the synthetic world of centred shapes on plain
        backgrounds (recipe_parts.shape_world), 2 x 32 px views; trains and evaluates (kNN and
        linear probe on shape) on a 2-core CPU in 5 to 8 minutes (README: measured figures
        on two seeds, random-init rows beside).
  v1    SimCLR v1's ResNet-50 recipe: global batch 4,096, 100 epochs of imagenet2012 read
        through TFDS, LARS with lr 4.8 (= 0.3 x batch / 256), weight decay 1e-6, biases and
        batch-norm parameters excluded from decay and trust-ratio scaling, 10 warmup epochs then
        cosine, 2-layer projection head to 128-d, temperature 0.1, crops of area (0.08, 1),
        colour jitter strength 1.0, blur p 0.5. Point data.path at your TFDS data_dir.
Options after the variant: e.g. 'demo,bs=128'.
"""

from big_contrast import config as bc, recipe_parts


def get_config(arg=None):
    return bc.build_recipe(arg, "simclr", {"demo": _demo, "v1": _paper}, shared=_simclr)


def _simclr(c):
    """What every SimCLR variant shares."""
    recipe_parts.ssl_augmentation_and_lars(c)
    c.objective = "simclr"
    c.simclr.loss = "ntxent"
    c.loss.temperature = 0.1
    c.data.multicrop.global_crops = 2
    c.data.multicrop.local_crops = 0
    c.data.multicrop.global_scale = (0.08, 1.0)
    c.optim.exclude_groups = ["vectors"]  # biases and batch-norm parameters


def _demo(c):
    recipe_parts.image_only_demo(c)
    c.total_steps = 600
    c.checkpoint_every = 300
    c.loss.temperature = 0.2
    # Crops of at least 70 % of the image keep the centred shape whole in both views; with
    # (0.3, 1) views often cut it off and the probes' seeds spread widely (README).
    c.data.multicrop.global_scale = (0.7, 1.0)


def _paper(c):
    recipe_parts.imagenet_resnet50(c)
    c.total_epochs = 100.0
