"""The same tiny CLIP trained by big_contrast (JAX) and by open_clip (PyTorch) on this CPU.

  python benchmarks/compare_open_clip.py [--steps 10] [--rounds 3] [--batch-size 256]

Model (both sides): ViT image tower, 4 layers x 128 wide (4 heads of 32, MLP 512), patch 8
on 32x32 images (16 patches + CLS); causal text transformer, 4 layers x 128 wide (4 heads,
MLP 512), 16 tokens, vocabulary 1,000, end-of-text pooling; linear projections to a 128-d
embedding; learnable logit scale; symmetric softmax InfoNCE; AdamW (lr 5e-4, betas 0.9/0.98,
eps 1e-6, weight decay 0.2 on matrices only), no gradient clipping, batch 256, float32.

Each side trains on one fixed random batch already in memory (no data pipeline), so only
the train step is timed: forward, backward, optimizer update (and open_clip's logit-scale
clamp; ours clamps inside its step). The process first calls
host_memory.keep_freed_memory(), as the trainer's entrypoint does (both sides run under it;
--glibc-malloc-defaults skips it). After a warm-up the two alternate, ``--steps`` steps each,
for ``--rounds`` rounds; the table gives the median samples/s of each side's rounds and their
ratio. torch runs with torch.set_num_threads(<CPU cores>) intra-op threads (XLA's
CPU client uses every core by default); --threads changes that. On a CPU shared with other
busy processes torch's OpenMP threads wait at every barrier for a descheduled peer (measured
on a loaded 2-core machine: ~55 samples/s with 2 threads, ~320 with 1), so compare on an
otherwise idle machine, or report --threads 1 beside the default. A sanity check prints our compiled step's FLOPs
(XLA cost analysis) and both sides' parameter counts, which must agree within a few %.

Installing the comparison side (not a dependency of big_contrast): torch and open_clip go
into a virtual environment that still sees the system site-packages, so jax, flax and this
project stay importable:

  python3 -m venv --system-site-packages ~/venv_openclip
  ~/venv_openclip/bin/pip install torch torchvision \\
      --index-url https://download.pytorch.org/whl/cpu   # or plain PyPI: pip install torch
  ~/venv_openclip/bin/pip install open_clip_torch
  PYTHONPATH=. ~/venv_openclip/bin/python benchmarks/compare_open_clip.py

Without torch or open_clip the benchmark prints these instructions and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
from machine import cpu_name

INSTALL = """\
compare_open_clip.py needs torch and open_clip, which are not big_contrast dependencies.
Install them into a venv that still sees this project's packages (jax, flax, big_contrast):

  python3 -m venv --system-site-packages ~/venv_openclip
  ~/venv_openclip/bin/pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu
  ~/venv_openclip/bin/pip install open_clip_torch
  PYTHONPATH=. ~/venv_openclip/bin/python benchmarks/compare_open_clip.py
"""

WIDTH, DEPTH, HEADS, MLP = 128, 4, 4, 512
IMAGE_SIZE, PATCH = 32, 8
CONTEXT, VOCAB, EMBED = 16, 1000, 128
LR, B1, B2, EPS, WD = 5e-4, 0.9, 0.98, 1e-6, 0.2


def _import_torch():
    try:
        import torch
        import open_clip
    except ImportError as e:
        sys.stderr.write(f"error: {e}\n\n{INSTALL}")
        sys.exit(2)
    return torch, open_clip


# ----------------------------------------------------------------------------- ours (JAX)


def our_config(batch_size: int):
    from big_contrast import config as config_lib

    c = config_lib.base_config()
    c.batch_size = batch_size
    c.total_steps = 10_000
    c.optim.name = "adamw"
    c.optim.lr, c.optim.b1, c.optim.b2, c.optim.eps = LR, B1, B2, EPS
    c.optim.weight_decay = WD
    c.optim.warmup_steps = 0
    c.optim.clip_norm = 0.0  # open_clip's default: no clipping
    c.model.image.type = "vit"
    c.model.image.variant = f"nano/{PATCH}"  # 128 wide, 4 layers, 4 heads, MLP 512
    c.model.image.pool = "cls"
    c.model.image.stem = "patch"
    c.model.text.variant = "nano"
    c.model.text.causal = True
    c.model.text.pool = "eos"
    c.model.embed_dim = EMBED
    c.model.projection = "linear"
    c.text.tokenizer = "words"
    c.text.max_len = CONTEXT
    c.text.vocab_size = VOCAB
    c.data.image_size = IMAGE_SIZE
    c.ema_decay = 0.0
    c.lock()
    return c


def random_tokens(rng, batch: int, eos: int, high: int) -> np.ndarray:
    """[B, CONTEXT] ids: BOS-free random words in [3, VOCAB), EOS at a random length, then 0s."""
    tokens = rng.integers(3, VOCAB, size=(batch, CONTEXT)).astype(np.int64)
    lengths = rng.integers(4, CONTEXT, size=batch)
    for row, n in enumerate(lengths):
        tokens[row, n] = eos
        tokens[row, n + 1:] = 0
    del high
    return tokens


class Ours:
    def __init__(self, batch_size: int, seed: int = 0):
        import jax

        from big_contrast import sharding
        from big_contrast.experiment import Experiment

        self.jax = jax
        config = our_config(batch_size)
        exp = Experiment(config)
        self.mesh = exp.mesh
        state = exp.state_factory.create()
        self.step_fn = exp.train_step()
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, size=(batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        tokens = random_tokens(rng, batch_size, exp.tokenizer.eos_id, VOCAB).astype(np.int32)
        self.batch = jax.device_put({"image": images, "text": tokens},
                                    sharding.batch_sharding(self.mesh))
        self.params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        with jax.set_mesh(self.mesh):
            compiled = self.step_fn.lower(state, self.batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.flops = float(cost.get("flops", float("nan")))
        self.state = state

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` train steps (dispatch to completion)."""
        jax = self.jax
        with jax.set_mesh(self.mesh):
            began = time.perf_counter()
            for _ in range(steps):
                self.state, metrics = self.step_fn(self.state, self.batch)
            jax.block_until_ready((self.state, metrics))
            return time.perf_counter() - began


# ----------------------------------------------------------------------------- open_clip (torch)


class Theirs:
    def __init__(self, batch_size: int, seed: int = 0):
        torch, open_clip = _import_torch()
        self.torch = torch
        torch.manual_seed(seed)
        vision = open_clip.CLIPVisionCfg(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS,
                                         mlp_ratio=MLP / WIDTH, patch_size=PATCH,
                                         image_size=IMAGE_SIZE)
        # pool_type 'argmax': pools the highest token id, the end-of-text token (vocab - 1) here.
        text = open_clip.CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH,
                                     heads=HEADS, layers=DEPTH, mlp_ratio=MLP / WIDTH)
        self.model = open_clip.CLIP(embed_dim=EMBED, vision_cfg=vision, text_cfg=text)
        self.model.train()
        self.loss = open_clip.ClipLoss()
        # open_clip's training/main.py grouping: no weight decay on gains, biases, logit_scale.
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        named = list(self.model.named_parameters())
        decay = [p for n, p in named if not exclude(n, p) and p.requires_grad]
        rest = [p for n, p in named if exclude(n, p) and p.requires_grad]
        self.opt = torch.optim.AdamW([{"params": rest, "weight_decay": 0.0},
                                      {"params": decay, "weight_decay": WD}],
                                     lr=LR, betas=(B1, B2), eps=EPS)
        rng = np.random.default_rng(seed)
        self.images = torch.from_numpy(
            rng.standard_normal((batch_size, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32))
        self.texts = torch.from_numpy(random_tokens(rng, batch_size, VOCAB - 1, VOCAB))
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self):
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        image_features, text_features, logit_scale = self.model(self.images, self.texts)
        total = self.loss(image_features, text_features, logit_scale)
        total.backward()
        self.opt.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        return total

    def run(self, steps: int) -> float:
        began = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        float(loss.detach())
        return time.perf_counter() - began


# ----------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (>= 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch intra-op threads (default: every CPU core)")
    parser.add_argument("--glibc-malloc-defaults", action="store_true",
                        help="skip host_memory.keep_freed_memory(), which the trainer calls")
    args = parser.parse_args()

    if not args.glibc_malloc_defaults:  # as the trainer's entrypoint does, for both sides
        from big_contrast import host_memory
        host_memory.keep_freed_memory()
    torch, open_clip = _import_torch()
    torch.set_num_threads(args.threads)
    import jax

    theirs = Theirs(args.batch_size)
    ours = Ours(args.batch_size)
    ours.run(args.warmup)
    theirs.run(args.warmup)
    our_times, their_times = [], []
    for _ in range(args.rounds):
        our_times.append(ours.run(args.steps))
        their_times.append(theirs.run(args.steps))
    bs, n = args.batch_size, args.steps
    our_rate = bs * n / statistics.median(our_times)
    their_rate = bs * n / statistics.median(their_times)
    cpu = cpu_name()
    print(f"CPU: {cpu}, {os.cpu_count()} cores; jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"open_clip {open_clip.__version__}")
    print(f"batch {bs}, {args.rounds} alternating rounds of {n} steps each, medians\n")
    print("| | samples/s (median) | step ms | rounds (samples/s) |")
    print("|---|---:|---:|---|")
    for name, rate, times in (("big_contrast (JAX)", our_rate, our_times),
                              ("open_clip (torch)", their_rate, their_times)):
        rounds = ", ".join(f"{bs * n / t:.0f}" for t in times)
        print(f"| {name} | {rate:.0f} | {1000 * bs / rate:.1f} | {rounds} |")
    print(f"| ratio ours / open_clip | {our_rate / their_rate:.2f}x | | |")
    print()
    print(f"sanity: our compiled step {ours.flops / 1e9:.2f} GFLOP "
          f"({ours.flops / 1e9 * our_rate / bs:.0f} GFLOP/s achieved); parameters: ours "
          f"{ours.params:,}, open_clip {theirs.params:,} "
          f"({100 * (ours.params / theirs.params - 1):+.2f}%)")
    if abs(ours.params / theirs.params - 1) > 0.03:
        print("WARNING: parameter counts differ by more than 3%: the models do not match")


if __name__ == "__main__":
    main()
