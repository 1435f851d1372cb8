"""Grain random-access sources, all yielding the same raw record layout:

  {'image': uint8 [H, W, 3] array or encoded bytes} or {'image_path': str},
  'caption': str, plus any integer label fields.

Sources: the synthetic world (no download), a CSV or JSONL manifest of (image path, caption)
rows, a prepared TFDS dataset through ``tfds.data_source`` (no TensorFlow), and ArrayRecord files
of msgpack records (see tools/build_array_record.py).
"""

from __future__ import annotations

import csv
import glob
import json
import os

import msgpack

from big_contrast.data import synthetic


class ManifestSource:
    """Rows of a CSV (with a header) or JSONL file naming an image file and its caption.

    Relative image paths resolve against the manifest's folder. The whole manifest is read
    once into two string lists; images are opened lazily by the decode transform.
    """

    def __init__(self, path: str, image_key: str = "image", caption_key: str = "caption"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"manifest {path!r} does not exist")
        rows = self._read_rows(path)
        if not rows:
            raise ValueError(f"manifest {path!r} has no rows")
        missing = {image_key, caption_key} - set(rows[0])
        if missing:
            raise ValueError(f"manifest {path!r} has no column(s) {sorted(missing)}; "
                             f"its columns are {sorted(rows[0])} (set data.image_key / caption_key)")
        root = os.path.dirname(os.path.abspath(path))
        self._paths = [os.path.join(root, r[image_key]) for r in rows]
        self._captions = [str(r[caption_key]) for r in rows]
        self.path = path

    @staticmethod
    def _read_rows(path: str) -> list[dict]:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        with open(path, newline="", encoding="utf-8") as f:
            dialect = "excel-tab" if path.endswith(".tsv") else "excel"
            return list(csv.DictReader(f, dialect=dialect))

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict:
        return {"image_path": self._paths[index], "caption": self._captions[index]}

    def __repr__(self) -> str:
        return f"ManifestSource({self.path!r}, {len(self)} rows)"


class TfdsSource:
    """A TFDS dataset prepared as ArrayRecord, read through ``tfds.data_source`` (no TF)."""

    def __init__(self, name: str, split: str, data_dir: str | None, image_key: str,
                 caption_key: str):
        import tensorflow_datasets as tfds  # heavy import, only for this source

        self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)
        self._image_key, self._caption_key = image_key, caption_key
        self.name = f"{name}:{split}"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return _normalise_fields(dict(self._source[index]), self._image_key, self._caption_key)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {len(self)} records)"


class ArrayRecordSource:
    """ArrayRecord files whose records are msgpack maps {image: encoded bytes, caption, labels}."""

    def __init__(self, pattern: str, image_key: str = "image", caption_key: str = "caption"):
        import grain

        files = sorted(glob.glob(pattern))
        if not files:
            raise FileNotFoundError(f"no ArrayRecord files match {pattern!r}")
        self._source = grain.sources.ArrayRecordDataSource(files)
        self._image_key, self._caption_key = image_key, caption_key
        self.pattern = pattern

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = msgpack.unpackb(self._source[index], raw=False)
        return _normalise_fields(record, self._image_key, self._caption_key)

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.pattern!r}, {len(self)} records)"


def _normalise_fields(record: dict, image_key: str, caption_key: str) -> dict:
    out = {k: v for k, v in record.items() if k not in (image_key, caption_key)}
    out["image"] = record[image_key]
    caption = record[caption_key]
    out["caption"] = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    return out


def encode_record(image_bytes: bytes, caption: str, **labels: int) -> bytes:
    """The ArrayRecord payload ArrayRecordSource reads back."""
    return msgpack.packb({"image": image_bytes, "caption": caption,
                          **{k: int(v) for k, v in labels.items()}}, use_bin_type=True)


def build_source(data_config, split: str):
    """The configured source for one split ('{split}' in paths is replaced by the split)."""
    kind = data_config.source
    if kind == "synthetic":
        syn = data_config.synthetic
        return synthetic.SyntheticWorld(split, num_records=syn.num_records,
                                        image_size=data_config.image_size,
                                        seed=syn.seed, two_object_prob=syn.two_object_prob,
                                        grey_prob=syn.grey_prob)
    path = data_config.path.format(split=split)
    if kind == "manifest":
        return ManifestSource(path, data_config.image_key, data_config.caption_key)
    if kind == "tfds":
        return TfdsSource(data_config.tfds_name, split, data_config.path or None,
                          data_config.image_key, data_config.caption_key)
    if kind == "array_record":
        return ArrayRecordSource(path, data_config.image_key, data_config.caption_key)
    raise ValueError(f"unknown data.source {kind!r}; choose synthetic, manifest, tfds or array_record")


def class_names(source, label_key: str):
    """The source's class names for a label field, if it declares them (the synthetic world)."""
    names = getattr(source, "class_names", {})
    return names.get(label_key)


def prompt_templates(source):
    return getattr(source, "prompt_templates", None)


def num_examples(source) -> int | None:
    """Examples per epoch, or None for the synthetic world (a fresh example per index)."""
    return None if isinstance(source, synthetic.SyntheticWorld) else len(source)

