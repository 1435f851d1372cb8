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

from big_contrast import config as bc


def get_config(arg=None):
    return bc.build_recipe(arg, "clip", {"demo": _demo, "B/32": _paper_b32})


def _demo(c):
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
    c.evals.zeroshot_val = dict(type="zero_shot", every=0, split="val", label_key="shape",
                                num_examples=1000, where={"num_objects": 1})
    c.evals.zeroshot_heldout = dict(type="zero_shot", every=0, split="heldout_combos",
                                    label_key="shape", num_examples=1000)
    c.evals.zeroshot_heldout_colour = dict(type="zero_shot", every=0, split="heldout_combos",
                                           label_key="colour", num_examples=1000)
    c.evals.retrieval_val = dict(type="retrieval", every=0, split="val", num_examples=1000)


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
    c.data.source = "array_record"
    c.data.path = "/data/image_text/{split}.array_record-*"
    c.data.image_size = 224
    c.data.num_workers = 16
    c.data.augment.crop_scale = (0.9, 1.0)
    c.evals.retrieval_val = dict(type="retrieval", every=10_000, split="val", num_examples=5_000)
