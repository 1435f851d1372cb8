"""CLIP (Radford et al. 2021): image tower + text tower, symmetric softmax InfoNCE.

Variants (the text after ':' in --config):
  demo   a small CLIP on the embedded synthetic world (BatchNorm ConvNet with mean+max pooling
         + bag-of-words text, EMA weights); trains and evaluates on a 2-core CPU in under 5
         minutes (README: measured figures on three seeds).
  B/32   the paper recipe for ViT-B/32: global batch 32,768, 32 epochs of 400M pairs, AdamW
         (lr 5e-4, wd 0.2, betas 0.9/0.98, eps 1e-6), 2,000 warmup steps, 224 px, 76 tokens.
         Point data.* at your image-text pairs and text.* at a 49,408-piece SentencePiece model.
Options after the variant: e.g. 'demo,bs=128' or 'B/32,bs=4096'.
"""

from big_contrast import config as bc, recipe_parts


def get_config(arg=None):
    return bc.build_recipe(arg, "clip", {"demo": _demo, "B/32": _paper_b32})


def _demo(c):
    recipe_parts.image_text_demo(c)


def _paper_b32(c):
    c.batch_size = 32_768
    c.total_examples = 32 * 400_000_000
    c.log_every = 100
    c.checkpoint_every = 2_000
    c.optim.lr = 5e-4
    c.optim.weight_decay = 0.2
    c.optim.warmup_steps = 2_000
    c.model.image.variant = "B/32"
    c.model.image.pool = "cls"
    c.model.image.remat = True
    c.model.text.variant = "M"  # 512 wide, 12 layers, 8 heads
    c.model.text.remat = True
    c.model.embed_dim = 512
    c.text.tokenizer = "sentencepiece"
    c.text.max_len = 77  # BOS + 75 tokens + EOS
    c.text.vocab_size = 49_408
    recipe_parts.image_text_pairs_on_disk(c, image_size=224)
    c.data.augment.crop_scale = (0.9, 1.0)
    c.evals.retrieval_val = dict(type="retrieval", every=10_000, split="val", num_examples=5_000)
