"""Writes a source's split as ArrayRecord files that data.source='array_record' reads back.

  python tools/build_array_record.py --config configs/clip.py:demo --split val \
      --output /data/world/val.array_record --num_records 10000 --shards 4

Images are stored PNG-encoded with their caption and integer labels (msgpack records), so any
source (the synthetic world, a CSV/JSONL manifest, TFDS) can be packed into fast random-access
shards once and streamed by grain.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from array_record.python import array_record_module
from PIL import Image

from big_contrast import config as config_lib
from big_contrast.data import sources, transforms


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write(source, output: str, num_records: int, shards: int) -> tuple[list[str], dict]:
    """Writes the usable records of [0, num_records) round-robin into ``shards`` files; returns
    their paths and the count of records left out, by reason."""
    paths = [f"{output}-{i:05d}-of-{shards:05d}" for i in range(shards)]
    writers = [array_record_module.ArrayRecordWriter(p, "group_size:1") for p in paths]
    skipped: dict = {}
    written = 0
    for index in range(num_records):
        record = source[index]
        try:
            image = transforms.decode_image(record)
            caption = transforms.clean_caption(record.get("caption", ""))
        except transforms.CorruptRecordError as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            continue
        labels = {k: int(v) for k, v in record.items()
                  if k not in ("image", "image_path", "caption") and np.ndim(v) == 0}
        writers[written % shards].write(
            sources.encode_record(encode_png(image), caption, **labels))
        written += 1
    for w in writers:
        w.close()
    return paths, skipped


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--output", required=True, help="path prefix of the shard files")
    parser.add_argument("--num_records", type=int, default=None, help="default: the whole split")
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args()
    config = config_lib.load_config_file(args.config)
    source = sources.build_source(config.data, args.split)
    n = len(source) if args.num_records is None else min(args.num_records, len(source))
    paths, skipped = write(source, args.output, n, args.shards)
    left_out = sum(skipped.values())
    print(f"wrote {n - left_out:,} records of {source!r} to {len(paths)} shard(s): "
          f"{args.output}-*" + (f"; left out {left_out} unusable record(s): " + ", ".join(
              f"{k} {v}" for k, v in sorted(skipped.items())) if left_out else ""))


if __name__ == "__main__":
    main()
