"""SigLIP (Zhai et al. 2023): the two-tower model trained with the pairwise sigmoid loss
instead of the softmax. Every image-caption pair of the global batch is a binary problem
(matching or not), so no row or column normalisation couples the batch; a learnable logit
scale (starting at 10) and bias (starting at -10, against the 1 : B-1 imbalance of positives)
are applied to the cosines. On several devices the loss runs as a ring: each device keeps its
own block of the B x B matrix and receives the others' text embeddings one chunk at a time.

Variants (the text after ':' in --config):
  demo  the CLIP demo (configs/clip.py:demo: BatchNorm ConvNet + bag-of-words text, 1,000
        steps of 128 on the synthetic world) with the sigmoid loss; README: measured beside CLIP.
  B/16  the paper recipe: ViT-B/16 at 256 px, a B-sized text transformer (64 tokens, 32k
        SentencePiece vocabulary), global batch 32,768, Adam (b2 0.95) at lr 1e-3 with
        decoupled weight decay 1e-4, 5k warmup steps then cosine, 40B examples seen. The paper's
        image tower pools with a MAP head; this one pools by the mean of the patch tokens.
        Point data.* at your pairs and text.* at the tokenizer model.
Options after the variant: e.g. 'demo,bs=64'.
"""

from big_contrast import config as bc, recipe_parts


def get_config(arg=None):
    return bc.build_recipe(arg, "siglip", {"demo": _demo, "B/16": _paper_b16}, shared=_siglip)


def _siglip(c):
    """What every SigLIP variant shares: the sigmoid loss, its initial scale and bias."""
    c.loss.contrastive = "sigmoid"
    c.model.init_scale = 10.0
    c.model.init_bias = -10.0


def _demo(c):
    recipe_parts.image_text_demo(c)


def _paper_b16(c):
    c.batch_size = 32_768
    c.total_examples = 40_000_000_000
    c.log_every = 100
    c.checkpoint_every = 2_000
    c.optim.lr = 1e-3
    c.optim.b2 = 0.95
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 5_000
    c.model.image.variant = "B/16"
    c.model.image.pool = "gap"
    c.model.image.remat = True
    c.model.text.variant = "B"
    c.model.text.pool = "eos"
    c.model.text.remat = True
    c.model.embed_dim = 768
    c.text.tokenizer = "sentencepiece"
    c.text.max_len = 64
    c.text.vocab_size = 32_000
    recipe_parts.image_text_pairs_on_disk(c, image_size=256)
    c.evals.retrieval_val = dict(type="retrieval", every=10_000, split="val", num_examples=5_000)
