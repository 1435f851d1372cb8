"""Settings that several recipes in configs/ share: the CPU image-text demo (CLIP and SigLIP),
the CPU demos of the image-only objectives (their network, optimizer, world, augmentation and
probes) and their ImageNet ResNet-50 recipes."""

from __future__ import annotations


def image_text_demo(c) -> None:
    """The CLIP demo (configs/clip.py:demo), which the SigLIP demo shares: a BatchNorm ConvNet
    with mean+max pooling and bag-of-words text on the synthetic world, 1,000 steps of 128,
    AdamW 4e-3, EMA weights, zero-shot shape (val, held-out) and colour, and retrieval."""
    c.batch_size = 128
    c.total_steps = 1000
    c.log_every = 50
    c.checkpoint_every = 250
    c.optim.lr = 4e-3
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = 50
    c.ema_decay = 0.99  # the reported result: the averaged weights (online ones beside them)
    c.model.image.type = "convnet"
    c.model.image.variant = "16x1,32,64"
    c.model.image.stem = "none"
    c.model.image.pool = "gap_max"
    c.model.text.variant = "bow"
    c.model.text.pool = "mean"
    c.model.embed_dim = 128
    c.text.tokenizer = "words"
    c.text.max_len = 24
    c.text.vocab_size = 4096
    c.data.image_size = 32
    c.eval_batch_size = 500
    synthetic_zero_shot_evals(c)
    c.evals.retrieval_val = dict(type="retrieval", every=0, split="val", num_examples=1000)


def image_text_pairs_on_disk(c, image_size: int) -> None:
    """The paper recipes' data: image-caption pairs in ArrayRecord shards (tools/
    build_array_record.py writes them) at /data/image_text/{split}.array_record-*, 16 grain
    workers. Point data.path at yours."""
    c.data.source = "array_record"
    c.data.path = "/data/image_text/{split}.array_record-*"
    c.data.image_size = image_size
    c.data.num_workers = 16


def synthetic_zero_shot_evals(c, colour: bool = True) -> None:
    """Zero-shot shape on single-object `val` images and on `heldout_combos` (colour-shape
    pairings never trained on) and, with ``colour``, zero-shot colour on `heldout_combos`."""
    c.evals.zeroshot_val = dict(type="zero_shot", every=0, split="val", label_key="shape",
                                num_examples=1000, where={"num_objects": 1})
    c.evals.zeroshot_heldout = dict(type="zero_shot", every=0, split="heldout_combos",
                                    label_key="shape", num_examples=1000)
    if colour:
        c.evals.zeroshot_heldout_colour = dict(type="zero_shot", every=0,
                                               split="heldout_combos", label_key="colour",
                                               num_examples=1000)


def shape_world(c) -> None:
    """The world of the SimCLR and SwAV demos: one object per image, centred, on a plain
    background (colour, size and the background's brightness still vary).

    Instance discrimination learns whatever tells two images apart most easily and survives
    the augmentations: on the full world that is the background texture and the object's
    position (probes of a SimCLR demo on it read background 0.93 and shape 0.28). Here shape
    is what is left. The probes read the val split of this same world.
    """
    c.data.synthetic.two_object_prob = 0.0
    c.data.synthetic.backgrounds = ("plain",)
    c.data.synthetic.positions = ("centre",)


def shape_probe_evals(c, every: int = 0, examples: int = 5000) -> None:
    """kNN and a linear probe of the shape label on `val` and `heldout_combos`, each beside the
    same evaluator on the randomly initialised network."""
    common = dict(every=every, splits=("val", "heldout_combos"), label_key="shape",
                  where={"num_objects": 1}, num_examples=1000)
    c.evals.knn = dict(type="knn", bank_examples=examples, **common)
    c.evals.linear_probe = dict(type="linear_probe", train_examples=examples, **common)


def ssl_augmentation_and_lars(c) -> None:
    """What SimCLR's and SwAV's official recipes share: the two-view projection head to 128-d,
    the SimCLR augmentation (flip, colour jitter 1.0 with probability 0.8, grayscale 0.2, blur
    0.5) and LARS (momentum 0.9, trust coefficient 0.001, no clipping, no name-based
    exclusions; which groups LARS spares is each recipe's own choice)."""
    c.model.embed_dim = 128
    c.model.head.layers = 2
    c.data.augment.flip = True
    c.data.augment.colour_jitter = 1.0
    c.data.augment.jitter_prob = 0.8
    c.data.augment.grayscale_prob = 0.2
    c.data.augment.blur_prob = 0.5
    c.optim.name = "lars"
    c.optim.momentum = 0.9
    c.optim.trust_coefficient = 0.001
    c.optim.clip_norm = 0.0
    c.optim.no_decay = []


def image_only_demo(c) -> None:
    """What the SimCLR and SwAV CPU demos share: a CIFAR-style ResNet 'tiny' with a max-pooled
    feature map, AdamW, the shape world, 32 px global crops of area (0.3, 1), colour taken away,
    and the shape probes."""
    c.batch_size = 128
    c.log_every = 50
    c.optim.name = "adamw"
    c.optim.lr = 2e-3
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 50
    c.model.image.type = "resnet"
    c.model.image.variant = "tiny"
    c.model.image.stem = "cifar"
    c.model.image.pool = "max"
    c.model.head.hidden_dim = 256
    shape_world(c)
    c.data.multicrop.global_scale = (0.3, 1.0)
    # Colour would be the easiest instance cue: any hue, and grey half the time.
    c.data.augment.hue_jitter = 0.5
    c.data.augment.grayscale_prob = 0.5
    c.data.augment.blur_prob = 0.0  # at 32 px the paper's sigma is under 0.3 px: a no-op
    c.eval_batch_size = 500
    shape_probe_evals(c)


def imagenet_resnet50(c) -> None:
    """What the SimCLR and SwAV paper recipes share: ResNet-50 on imagenet2012 read through
    TFDS at 224 px, global batch 4,096, LARS at lr 4.8 with weight decay 1e-6 after 10 warmup
    epochs, and a kNN monitor on the validation split. Point data.path at your data_dir."""
    c.batch_size = 4096
    c.log_every = 100
    c.checkpoint_every = 2_500
    c.optim.lr = 4.8
    c.optim.weight_decay = 1e-6
    c.optim.warmup_epochs = 10.0
    c.model.image.type = "resnet"
    c.model.image.variant = "50"
    c.model.image.stem = "imagenet"
    c.model.image.pool = "gap"
    c.model.head.hidden_dim = 2048
    c.data.source = "tfds"
    c.data.tfds_name = "imagenet2012"
    c.data.path = "/data/tensorflow_datasets"
    c.data.image_size = 224
    c.data.num_workers = 32
    c.eval_batch_size = 1024
    c.evals.knn = dict(type="knn", every=25_000, splits=("validation",), label_key="label",
                       num_examples=10_000, bank_examples=100_000, bank_split="train")
