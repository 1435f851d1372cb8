"""CoCa (Yu et al. 2022): contrastive captioner. An image tower whose tokens feed two
attentional poolers (1 query: the contrastive image embedding; N queries: what the decoder
reads), a text decoder split into a unimodal half (its CLS gives the contrastive text
embedding) and a multimodal half that cross-attends to the image, trained with
1 x contrastive + 2 x captioning loss from one forward pass.

Variants (the text after ':' in --config):
  demo  a small CoCa on the embedded synthetic world: the CLIP demo's BatchNorm ConvNet
        (its 8x8 last feature map as 64 image tokens), a 64-wide decoder with 1 unimodal and
        1 multimodal layer, the built-in invertible word vocabulary; minutes on a 2-core CPU
        (README: measured figures). Reports zero-shot (contrastive and generative),
        retrieval, and captioning (CIDEr-D, attribute accuracy) on val and heldout_combos.
  B     CoCa-Base: ViT-B/18 at 288 px, 12 unimodal + 12 multimodal decoder layers of width
        768, 256 decoder queries, global batch 65,536 for 500k steps, Adafactor (momentum
        0.9, second-moment decay capped at 0.999: optim.capped_second_moment_decay), lr 8e-4,
        2 % warmup then linear decay, decoupled weight decay 0.01, a 64k vocabulary.
        Point data.* at your pairs (data.mixture adds labelled images as captions) and
        text.model_path at a 64k SentencePiece model.
Options after the variant: e.g. 'demo,bs=64'.
"""

from big_contrast import config as bc, recipe_parts


def get_config(arg=None):
    return bc.build_recipe(arg, "coca", {"demo": _demo, "B": _paper_base}, shared=_coca)


def _coca(c):
    """What every CoCa variant shares."""
    c.objective = "coca"
    c.loss.contrastive_weight = 1.0
    c.loss.caption_weight = 2.0
    c.optim.no_decay = ["posemb", "/cls$", "log_scale", "queries"]


def _demo(c):
    c.batch_size = 128
    c.total_steps = 1300  # at 1,000 steps held-out zero-shot was 0.846 and 0.814 (seeds 0, 1)
    c.log_every = 50
    c.checkpoint_every = 325
    c.optim.lr = 4e-3
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = 50
    c.ema_decay = 0.99
    c.model.image.type = "convnet"
    c.model.image.variant = "16x1,32,64"
    c.model.image.stem = "none"
    c.model.image.pool = "gap"  # unused: the attentional poolers read the 64 tokens
    c.model.text.variant = "pico"  # 64 wide, 2 heads
    c.model.decoder.unimodal_depth = 1
    c.model.decoder.multimodal_depth = 1
    c.model.decoder.queries = 16
    c.model.embed_dim = 128
    c.text.tokenizer = "vocab"  # the world's caption words: invertible, so captions decode
    c.text.max_len = 24
    c.data.image_size = 32
    c.eval_batch_size = 500
    recipe_parts.synthetic_zero_shot_evals(c, colour=False)
    c.evals.generative_zeroshot_heldout = dict(type="zero_shot", every=0, split="heldout_combos",
                                               label_key="shape", num_examples=1000,
                                               scorer="generative")
    c.evals.retrieval_val = dict(type="retrieval", every=0, split="val", num_examples=1000)
    c.evals.captioning_val = dict(type="captioning", every=0, split="val", num_examples=1000,
                                  where={"num_objects": 1})
    c.evals.captioning_heldout = dict(type="captioning", every=0, split="heldout_combos",
                                      num_examples=1000)


def _paper_base(c):
    c.batch_size = 65_536
    c.total_steps = 500_000
    c.log_every = 100
    c.checkpoint_every = 5_000
    c.optim.name = "adafactor"
    c.optim.lr = 8e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-30
    c.optim.weight_decay = 0.01
    c.optim.warmup_steps = 10_000  # 2 % of 500k
    c.optim.decay = "linear"
    c.optim.clip_norm = 0.0
    c.model.image.type = "vit"
    c.model.image.variant = "B/18"
    c.model.image.pool = "gap"  # unused: the attentional poolers read the tokens
    c.model.image.remat = True
    c.model.text.variant = "B"  # 768 wide, 12 heads; 12 layers per half
    c.model.decoder.queries = 256
    c.model.embed_dim = 768
    c.text.tokenizer = "sentencepiece"
    c.text.max_len = 64
    c.text.vocab_size = 64_000
    recipe_parts.image_text_pairs_on_disk(c, image_size=288)
    c.evals.retrieval_val = dict(type="retrieval", every=10_000, split="val", num_examples=5_000)
