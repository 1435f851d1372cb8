"""Host input pipeline throughput from JPEGs in ArrayRecord, per grain worker count, and how
many decode workers (CPU cores) a GPU host needs to keep a training step fed.

  python benchmarks/input_pipeline.py [--workers 0 1 2] [--pipelines clip swav]
      [--num_images 2000] [--max_side 500] [--batch_size 64] [--batches 10] [--warmup 2]
      [--data_dir DIR]
      [--step_samples_per_second 3210] [--swav_step_samples_per_second 2598]
      [--accelerators_per_host 8]

Data: --num_images JPEG-encoded images (quality 90, 4:2:0, about 180 kpx and 110 KB on
average, like ImageNet's training JPEGs: 500 x 375 and 375 x 500 mostly, longer side 320-500
otherwise; --max_side scales them, e.g. 256 for shards stored pre-resized) written as the
project's msgpack records (sources.encode_record) into 4 ArrayRecord shards in a temporary
folder (or --data_dir, reused when it already holds them).
Each image is a scene of the synthetic world (big_contrast/data/synthetic.py, with its
caption) rendered at 64 px and upscaled, plus 1/f colour noise for natural-image-like texture
and JPEG entropy.

Pipelines, each the training pipeline's own grain graph (pipeline.example_stream: ArrayRecord
source, seeded global shuffle, TrainPreprocess, grain worker processes for data.num_workers >
0) with the recipe's batch spec and data settings and data.path pointed at the shards:
  clip  configs/clip.py:B/32 (224 px, one view: random resized crop of area (0.9, 1), no flip,
        as the recipe says; a ViT-B/16 recipe would read the same pixels) and its caption
        tokenised by SentencePiece to 77 tokens (a model trained here on the captions).
  swav  configs/swav.py:800ep: 2 x 224 at area (0.14, 1) + 6 x 96 at (0.05, 0.14), each with
        flip, colour jitter (s=1, p=0.8), grayscale (p=0.2) and Gaussian blur (p=0.5); no
        captions and, as the recipe is written, no solarisation.
Batches are stacked in this process as TrainBatches does (np.stack of --batch_size examples);
TrainBatches' device put (jax.make_array_from_callback) is left out: this is the host side.

Printed:
- stage costs: one core, this process, ms per image (median over images) of each step of the
  preprocessing, and of the SwAV view's photometric operations per call. 'CPU ms' counts every
  thread of this process.
- throughput per worker count, after --warmup batches (which include starting the workers):
  samples/s over --batches batches (wall clock); per worker (samples/s / workers; 0 workers:
  everything in this process); worker CPU ms/sample (CPU time of the worker processes, from
  /proc); main CPU ms/sample (this process: receiving examples from the workers and stacking
  them; with 0 workers, everything); per-core rate = 1000 / worker CPU ms (0 workers: main).
  CPU times depend less than wall-clock rates on what else runs on the machine (contention
  for caches and memory bandwidth still shows in them).
- workers needed: host demand = step samples/s per accelerator x accelerators per host;
  workers = ceil(demand / per-core rate), the per-core rate being the median over the rows
  with workers > 0. The main process must also receive every example from the workers and
  stack it: its ceiling is 1000 / main CPU ms per sample (median of the same rows), and main
  processes needed = ceil(demand / ceiling), to compare with the one process per host or per
  accelerator a run starts.

The default step rates are estimates from FLOPs, not measurements: training = 3 x forward
FLOPs (no recomputation counted), on an H100 SXM (989 TFLOP/s dense bf16) at --mfu for the
ViT (0.4) and --swav_mfu for the ResNet-50 (0.2; convolutions with BatchNorm run further below
peak). CLIP ViT-B/16 at 224 px: image tower 17.6 G multiply-adds (the "17.6 GFLOPs" usually
quoted for ViT-B/16 counts multiply-adds) + the recipe's text tower (12 layers, 512 wide, 77
tokens) 3.0 G = 41 GFLOP forward, 123 GFLOP per trained pair. SwAV ResNet-50: 4.09 G
multiply-adds at 224 px, x (96/224)^2 at 96 px: 2 x 224 + 6 x 96 = 12.7 G = 76 GFLOP per
trained image.

"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import math
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))  # train_tokenizer.train

import numpy as np  # noqa: E402
from machine import cpu_name  # noqa: E402
from PIL import Image, features  # noqa: E402

JPEG_QUALITY = 90
SHARDS = 4
STAGE_IMAGES = 32


def transformer_macs(width: int, layers: int, tokens: int) -> float:
    """Multiply-adds of a transformer encoder's forward pass: per layer and token the QKV and
    output projections (4 d^2) and an MLP of 4 d (8 d^2), plus the attention scores and the
    weighted sum of values (2 n d)."""
    return layers * (12 * width ** 2 * tokens + 2 * tokens ** 2 * width)


PEAK_FLOPS = 989e12  # H100 SXM, dense bf16
# ViT-B/16 at 224 px: 196 patches + the class token, plus the patch embedding: 17.56 G.
VIT_B16_MACS = transformer_macs(768, 12, 197) + 196 * (16 * 16 * 3) * 768
TEXT_M_MACS = transformer_macs(512, 12, 77)  # CLIP's text tower ('M'): 2.98 G
RESNET50_MACS_224 = 4.09e9  # the usual "4.1 GFLOPs" of ResNet-50, which are multiply-adds


def clip_step_rate(mfu: float) -> float:
    """Estimated CLIP ViT-B/16 (224 px, 77-token text tower of width 512) training pairs/s on
    one H100 at ``mfu``: 3 x forward FLOPs (2 per multiply-add)."""
    flops = 3 * 2 * (VIT_B16_MACS + TEXT_M_MACS)
    return mfu * PEAK_FLOPS / flops


def swav_step_rate(mfu: float) -> float:
    """Estimated SwAV ResNet-50 (2 x 224 + 6 x 96 crops) training images/s on one H100."""
    macs = RESNET50_MACS_224 * (2 + 6 * (96 / 224) ** 2)
    return mfu * PEAK_FLOPS / (3 * 2 * macs)


# ---------------------------------------------------------------------------------- the data

def noise_fields(rng: np.random.Generator, count: int, side: int, amplitude: float,
                 alpha: float = 0.9) -> list[np.ndarray]:
    """Colour noise with a 1/f^alpha amplitude spectrum (natural images: alpha about 1), int16
    [side, side, 3] of standard deviation ``amplitude``; the channels share most of their
    content, as in photographs."""
    fy, fx = np.fft.fftfreq(side)[:, None], np.fft.rfftfreq(side)[None, :]
    freq = np.hypot(fy, fx)
    freq[0, 0] = 1.0
    spectrum = (freq ** -alpha).astype(np.float32)
    spectrum[0, 0] = 0.0

    def draw():
        return (rng.standard_normal(spectrum.shape, np.float32)
                + 1j * rng.standard_normal(spectrum.shape, np.float32)) * spectrum

    fields = []
    for _ in range(count):
        common = draw()
        x = np.stack([np.fft.irfft2(common + 0.6 * draw(), s=(side, side)) for _ in range(3)], -1)
        fields.append((amplitude * (x - x.mean()) / x.std()).astype(np.int16))
    return fields


def image_size(rng: np.random.Generator, max_side: int = 500) -> tuple[int, int]:
    """(width, height) in the spirit of ImageNet's JPEGs: longer side ``max_side`` (500) three
    times in four, else 64-100% of it; mostly 4:3, landscape three times in four."""
    long = max_side
    if rng.random() >= 0.75:
        long = int(rng.integers(max_side * 16 // 25, max_side + 1))
    ratio = rng.choice([4 / 3, 3 / 2, 1.0, 5 / 4], p=[0.6, 0.2, 0.1, 0.1])
    short = int(round(long / ratio))
    return (long, short) if rng.random() < 0.75 else (short, long)


def write_shards(folder: str, num_images: int, max_side: int = 500, seed: int = 0) -> dict:
    """Writes num_images JPEG records into SHARDS ArrayRecord files; returns statistics."""
    from array_record.python import array_record_module

    from big_contrast.data import sources, synthetic

    rng = np.random.default_rng(seed)
    world = synthetic.SyntheticWorld("train", image_size=64, seed=seed)
    fields = noise_fields(rng, 8, max(512, max_side), amplitude=36.0)
    paths = [os.path.join(folder, f"train.array_record-{i:05d}-of-{SHARDS:05d}")
             for i in range(SHARDS)]
    writers = [array_record_module.ArrayRecordWriter(p, "group_size:1") for p in paths]
    total_bytes = total_pixels = 0
    for index in range(num_images):
        record = world[index]
        width, height = image_size(rng, max_side)
        scene = Image.fromarray(record["image"]).resize((width, height), Image.BICUBIC)
        field = fields[int(rng.integers(len(fields)))]
        top = int(rng.integers(field.shape[0] - height + 1))
        left = int(rng.integers(field.shape[1] - width + 1))
        pixels = np.asarray(scene).astype(np.int16) + field[top:top + height, left:left + width]
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            buffer, format="JPEG", quality=JPEG_QUALITY)
        encoded = buffer.getvalue()
        writers[index % SHARDS].write(sources.encode_record(encoded, record["caption"]))
        total_bytes += len(encoded)
        total_pixels += width * height
    for writer in writers:
        writer.close()
    return {"images": num_images, "max_side": max_side, "mean_kb": total_bytes / num_images / 1e3,
            "mean_kpx": total_pixels / num_images / 1e3}


def train_sentencepiece(texts, path: str) -> None:
    """tools/train_tokenizer.py's model (vocabulary 500) on ``texts``, its log kept quiet."""
    import train_tokenizer

    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w", encoding="utf-8") as null:
        os.dup2(null.fileno(), 2)
        try:
            train_tokenizer.train(texts, path, vocab_size=500)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def captions(num: int, seed: int = 0):
    from big_contrast.data import synthetic

    world = synthetic.SyntheticWorld("train", image_size=16, seed=seed)
    return [world[i]["caption"] for i in range(num)]


# ---------------------------------------------------------------------------------- configs

def pipelines(data_glob: str, tokenizer_path: str) -> dict:
    """name -> (config, batch spec, tokenizer or None), each read from its recipe file."""
    from big_contrast import config as config_lib
    from big_contrast.data import tokenizers
    from big_contrast.objectives.contrastive import image_text_spec
    from big_contrast.objectives.image_only import multicrop_spec

    out = {}
    clip = config_lib.load_config_file(os.path.join(REPO, "configs/clip.py:B/32"))
    config_lib.apply_overrides(clip, {"data.path": data_glob,
                                      "text.model_path": tokenizer_path})
    tokenizer = tokenizers.get_tokenizer(clip.text.tokenizer, clip.text.max_len,
                                         clip.text.vocab_size, clip.text.model_path,
                                         clip.data.source)
    out["clip"] = (clip, image_text_spec(clip), tokenizer)
    swav = config_lib.load_config_file(os.path.join(REPO, "configs/swav.py:800ep"))
    config_lib.apply_overrides(swav, {"data.source": "array_record", "data.path": data_glob})
    out["swav"] = (swav, multicrop_spec(swav), None)
    return out


# ---------------------------------------------------------------------------------- measuring

def _children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's live child processes (grain's workers),
    from /proc; 0 where /proc cannot be read."""
    me, total = os.getpid(), 0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # fields[0] is the state, [1] the parent, [11:13] utime, stime
            total += int(fields[11]) + int(fields[12])
    return total / tick


def _per_image(fn, items) -> tuple[float, float]:
    """Median wall ms and median process-CPU ms of fn(item) over items."""
    walls, cpus = [], []
    for item in items:
        wall, cpu = time.perf_counter(), time.process_time()
        fn(item)
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return 1e3 * float(np.median(walls)), 1e3 * float(np.median(cpus))


def stage_costs(configs: dict) -> list[tuple]:
    """(stage, wall ms, CPU ms) rows, per image or per call, in this process."""
    from big_contrast.data import augment, sources, transforms

    clip, clip_spec, tokenizer = configs["clip"]
    _, swav_spec, _ = configs["swav"]
    source = sources.build_source(clip.data, clip.data.train_split)
    indices = range(0, len(source), max(1, len(source) // STAGE_IMAGES))[:STAGE_IMAGES]
    records = [source[i] for i in indices]
    images = [transforms.decode_image(r) for r in records]
    rng = np.random.default_rng(0)
    rows = [
        ("read a record (ArrayRecord + msgpack)", *_per_image(source.__getitem__, indices)),
        ("decode the JPEG (PIL, to RGB)", *_per_image(transforms.decode_image, records)),
        ("clip: crop (0.9, 1) -> 224", *_per_image(
            lambda im: transforms.augment_view(im, clip_spec.views[0], rng), images)),
        ("clip: tokenise the caption (SentencePiece, 77)", *_per_image(
            tokenizer.encode, [r["caption"] for r in records])),
        ("swav: 2 global views (224, all augmentations)", *_per_image(
            lambda im: [transforms.augment_view(im, v, rng) for v in swav_spec.views[:2]],
            images)),
        ("swav: 6 local views (96, all augmentations)", *_per_image(
            lambda im: [transforms.augment_view(im, v, rng) for v in swav_spec.views[2:]],
            images)),
    ]
    for size, scale in ((224, swav_spec.views[0].crop_scale), (96, swav_spec.views[-1].crop_scale)):
        crops = [transforms.random_resized_crop(im, size, scale, rng) for im in images]
        rows += [
            (f"  per call: random resized crop {scale} -> {size}", *_per_image(
                lambda im: transforms.random_resized_crop(im, size, scale, rng), images)),
            (f"  per call: colour jitter at {size}", *_per_image(
                lambda c: augment.colour_jitter(c, rng, 0.8, 0.8, 0.8, 0.2), crops)),
            (f"  per call: grayscale at {size}", *_per_image(augment.grayscale, crops)),
        ]
        sigmas = rng.uniform(0.1, 2.0, len(crops)) * size / 224
        blurs = list(zip(crops, sigmas))
        rows.append((f"  per call: gaussian blur at {size}",
                     *_per_image(lambda cs: augment.gaussian_blur(*cs), blurs)))
    return rows


def measure(name: str, configs: dict, workers: int, batch_size: int, warmup: int,
            batches: int) -> dict:
    """Samples/s and CPU per sample of one pipeline at one worker count."""
    from big_contrast.data import mixture, pipeline, transforms

    config, spec, tokenizer = configs[name]
    config.data.num_workers = workers
    source = mixture.build_train_source(config.data, captions=spec.text, seed=config.seed)
    iterator = iter(pipeline.example_stream(source, config.data, spec, tokenizer, config.seed))
    corrupt = 0

    def next_batch():
        nonlocal corrupt
        examples = []
        while len(examples) < batch_size:
            element = next(iterator)
            if transforms.CORRUPT_KEY in element:
                corrupt += 1
                continue
            examples.append(element)
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    try:
        began = time.perf_counter()
        for _ in range(warmup):
            batch = next_batch()
        warm_s = time.perf_counter() - began
        main_cpu, workers_cpu = time.process_time(), _children_cpu_seconds()
        began = time.perf_counter()
        for _ in range(batches):
            batch = next_batch()
        wall = time.perf_counter() - began
        main_cpu = time.process_time() - main_cpu
        workers_cpu = _children_cpu_seconds() - workers_cpu
    finally:
        if hasattr(iterator, "close"):
            iterator.close()
    samples = batches * batch_size
    worker_ms = 1e3 * (workers_cpu if workers else main_cpu) / samples
    return {"pipeline": name, "workers": workers, "samples_per_s": samples / wall,
            "wall_s": wall, "warmup_s": warm_s, "worker_ms": worker_ms,
            "main_ms": 1e3 * main_cpu / samples, "per_core": 1e3 / worker_ms,
            "corrupt": corrupt,
            "shapes": ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in batch.items())}


# ---------------------------------------------------------------------------------- report

def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="data.num_workers values to measure")
    parser.add_argument("--pipelines", nargs="+", default=["clip", "swav"],
                        choices=["clip", "swav"])
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_side", type=int, default=500,
                        help="the images' usual longer side in pixels (ImageNet: 500)")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=2,
                        help="batches before timing (they include starting the workers)")
    parser.add_argument("--data_dir", default="",
                        help="keep the shards here and reuse them (default: a temporary folder)")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="model FLOPs utilisation assumed for the CLIP ViT-B/16 step")
    parser.add_argument("--swav_mfu", type=float, default=0.2,
                        help="model FLOPs utilisation assumed for the SwAV ResNet-50 step")
    parser.add_argument("--step_samples_per_second", type=float, default=None,
                        help="CLIP ViT-B/16 pairs/s per accelerator (default: the FLOPs "
                             "estimate for an H100 at --mfu)")
    parser.add_argument("--swav_step_samples_per_second", type=float, default=None,
                        help="SwAV ResNet-50 multi-crop images/s per accelerator (default: the "
                             "FLOPs estimate for an H100 at --swav_mfu)")
    parser.add_argument("--accelerators_per_host", type=int, default=8)
    args = parser.parse_args()

    step_rates = {
        "clip": (args.step_samples_per_second or clip_step_rate(args.mfu),
                 "CLIP ViT-B/16, 224 px" + ("" if args.step_samples_per_second
                                            else f" (estimate: H100 bf16 at {args.mfu:.0%} MFU)")),
        "swav": (args.swav_step_samples_per_second or swav_step_rate(args.swav_mfu),
                 "SwAV ResNet-50, 2x224+6x96" + (
                     "" if args.swav_step_samples_per_second
                     else f" (estimate: H100 bf16 at {args.swav_mfu:.0%} MFU)")),
    }

    print(f"{os.cpu_count()} cores ({cpu_name()}), Python {platform.python_version()}, "
          f"numpy {np.__version__}, Pillow {_version('pillow')} (libjpeg-turbo "
          f"{features.version('libjpeg_turbo') or 'no'}), grain {_version('grain')}, "
          f"array-record {_version('array-record')}, sentencepiece {_version('sentencepiece')}; "
          f"load average {os.getloadavg()[0]:.1f} at the start\n", flush=True)

    with contextlib.ExitStack() as stack:
        folder = args.data_dir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="input_pipeline_"))
        os.makedirs(folder, exist_ok=True)
        stats_path = os.path.join(folder, "stats.txt")
        began = time.perf_counter()
        keys = ("images", "max_side", "mean_kb", "mean_kpx")
        stats = {}
        if os.path.exists(stats_path):
            with open(stats_path, encoding="utf-8") as f:
                stats = dict(zip(keys, map(float, f.read().split())))
        if (stats.get("images"), stats.get("max_side")) != (args.num_images, args.max_side):
            for entry in os.listdir(folder):
                if entry.startswith("train.array_record-"):
                    os.remove(os.path.join(folder, entry))
            stats = write_shards(folder, args.num_images, args.max_side)
            with open(stats_path, "w", encoding="utf-8") as f:
                f.write(" ".join(str(stats[k]) for k in keys))
        tokenizer_path = os.path.join(folder, "captions.model")
        if not os.path.exists(tokenizer_path):
            train_sentencepiece(captions(2000), tokenizer_path)
        print(f"data: {int(stats['images']):,} JPEGs (quality {JPEG_QUALITY}), mean "
              f"{stats['mean_kpx']:.0f} kpx, {stats['mean_kb']:.0f} KB, in {SHARDS} ArrayRecord "
              f"shards ({time.perf_counter() - began:.0f} s to write or find)\n", flush=True)

        configs = pipelines(os.path.join(folder, "{split}.array_record-*"), tokenizer_path)
        print("Stage costs, one core in this process (median over "
              f"{STAGE_IMAGES} images):\n")
        print("| stage | wall ms | CPU ms |")
        print("|---|---:|---:|")
        for stage, wall, cpu in stage_costs(configs):
            print(f"| {stage} | {wall:.2f} | {cpu:.2f} |", flush=True)

        print(f"\nThroughput, batch {args.batch_size}, {args.batches} batches after "
              f"{args.warmup} warm-up batches:\n")
        print("| pipeline | workers | samples/s | per worker | worker CPU ms/sample "
              "| main CPU ms/sample | per-core rate (samples/s) | warm-up s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        results = []
        for name in args.pipelines:
            for workers in args.workers:
                row = measure(name, configs, workers, args.batch_size, args.warmup, args.batches)
                results.append(row)
                print(f"| {name} | {workers} | {row['samples_per_s']:.0f} | "
                      f"{row['samples_per_s'] / max(workers, 1):.0f} | {row['worker_ms']:.2f} | "
                      f"{row['main_ms']:.2f} | {row['per_core']:.0f} | {row['warmup_s']:.1f} |",
                      flush=True)
        for name in args.pipelines:
            row = next(r for r in results if r["pipeline"] == name)
            print(f"{name} batch: {row['shapes']}" + (
                f"; {row['corrupt']} corrupt records skipped" if row["corrupt"] else ""))

    print(f"\nWorkers (cores) needed per GPU host of {args.accelerators_per_host} accelerators "
          "(per-core rate: median of the rows with workers > 0):\n")
    print("| pipeline | step | samples/s per accelerator | host demand | per-core rate "
          "| workers needed | main-process ceiling | main processes needed |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.pipelines:
        rows = [r for r in results if r["pipeline"] == name]
        with_workers = [r for r in rows if r["workers"] > 0] or rows
        per_core = float(np.median([r["per_core"] for r in with_workers]))
        main_ceiling = 1e3 / float(np.median([r["main_ms"] for r in with_workers]))
        rate, label = step_rates[name]
        demand = rate * args.accelerators_per_host
        print(f"| {name} | {label} | {rate:,.0f} | {demand:,.0f} | {per_core:.0f} | "
              f"{math.ceil(demand / per_core)} | {main_ceiling:,.0f} | "
              f"{math.ceil(demand / main_ceiling)} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
