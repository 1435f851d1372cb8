"""ALIGN (Jia et al. 2021): EfficientNet image tower + bidirectional BERT-style text tower with
[CLS] pooling, softmax InfoNCE with a learned temperature, LAMB.

Variants (the text after ':' in --config):
  demo  a CPU-sized ALIGN on the embedded synthetic world: EfficientNet 'small' cut to B0's
        first four stages (the first two Fused-MBConv, a stride-1 stem) and a 2-layer
        bidirectional text encoder (mean-pooled), AdamW; about 7 minutes on a 2-core CPU
        (README, "ALIGN demo": held-out shape top-1 and retrieval on three seeds).
  L2    the paper recipe: EfficientNet-L2 at 289 px, BERT-Large text (64 tokens, [CLS] pooled,
        linear projection to 640-d), global batch 16,384, LAMB (lr 1e-3, weight decay 1e-5),
        10k warmup steps then linear decay to 0 at 1.2M steps. Point data.* at your pairs and
        text.* at a 100k-piece tokenizer model.
Options after the variant: e.g. 'demo,bs=64'.
"""

from big_contrast import config as bc, recipe_parts


def get_config(arg=None):
    return bc.build_recipe(arg, "align", {"demo": _demo, "L2": _paper_l2}, shared=_align)


def _align(c):
    """What every ALIGN variant shares."""
    c.model.image.type = "efficientnet"
    c.model.image.stem = "stride2"
    c.model.image.pool = "gap"
    c.model.text.causal = False  # BERT-style: every token sees the whole caption
    c.model.text.pool = "first"  # the [CLS] position (our tokenizers put BOS there)
    c.optim.name = "lamb"
    c.optim.decay = "linear"
    c.optim.b2 = 0.999
    c.optim.no_decay = ["log_scale"]
    c.evals.retrieval_val = dict(type="retrieval", every=0, split="val", num_examples=1000)


def _demo(c):
    c.batch_size = 128
    c.total_steps = 1000
    c.log_every = 50
    c.checkpoint_every = 250
    # AdamW with the CLIP demo's weight decay: in a few hundred steps LAMB (the paper's
    # optimizer, which `L2` keeps) learnt colour but little shape here (README, "ALIGN demo").
    c.optim.name = "adamw"
    c.optim.lr = 4e-3
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = 50
    c.ema_decay = 0.99
    # 32 px images: B0's widths in its first four stages (a third of its depth), the first two
    # stages Fused-MBConv (EfficientNetV2) and a stride-1 stem, so the last map is 4 x 4; mean+max
    # pooling, running statistics that follow a short run, no stochastic depth. The full-depth,
    # quarter-width 'tiny' tower learnt colour but hardly any shape in the same time.
    c.model.image.variant = "small"
    c.model.image.stages = 4
    c.model.image.fused_stages = 2
    c.model.image.stem = "stride1"
    c.model.image.pool = "gap_max"
    c.model.image.bn_momentum = 0.9
    c.model.image.drop_connect = 0.0
    c.model.text.variant = "pico"
    c.model.text.pool = "mean"  # every token's output, averaged: learnt faster than [CLS] here
    # with the previous tower (README, "ALIGN demo")
    c.model.embed_dim = 128
    c.text.tokenizer = "words"
    c.text.max_len = 24
    c.text.vocab_size = 4096
    c.data.image_size = 32
    recipe_parts.synthetic_zero_shot_evals(c)


def _paper_l2(c):
    c.batch_size = 16_384
    c.total_steps = 1_200_000
    c.log_every = 100
    c.checkpoint_every = 5_000
    c.optim.lr = 1e-3
    c.optim.weight_decay = 1e-5
    c.optim.warmup_steps = 10_000
    c.model.image.variant = "L2"
    c.model.image.remat = True
    c.model.text.variant = "L"  # BERT-Large: 1024 wide, 24 layers, 16 heads
    c.model.text.remat = True
    c.model.embed_dim = 640
    c.text.tokenizer = "sentencepiece"
    c.text.max_len = 64
    c.text.vocab_size = 100_000
    recipe_parts.image_text_pairs_on_disk(c, image_size=289)
    c.data.augment.crop_scale = (0.08, 1.0)  # random resized crop
    c.data.augment.flip = True
    c.evals.retrieval_val.every = 10_000
    c.evals.retrieval_val.num_examples = 5_000
