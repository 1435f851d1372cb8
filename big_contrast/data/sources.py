"""Grain random-access sources, all yielding the same raw record layout:

  {'image': uint8 [H, W, 3] array or encoded bytes} or {'image_path': str},
  'caption': str (absent from labelled image sets), plus any integer label fields;
  or {'corrupt': reason} for a record that could not be read.

Sources: the synthetic world (no download), a CSV/TSV/JSONL manifest of (image path, caption
[, label]) rows, a folder of class folders of images (torchvision's ImageFolder layout), a
prepared TFDS dataset through ``tfds.data_source`` (no TensorFlow), and ArrayRecord files of
msgpack records (see tools/build_array_record.py). LabelledAsCaptions gives the records of any
labelled source a caption made from their class name.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re

import msgpack
import numpy as np

from big_contrast.data import synthetic


class ManifestSource:
    """Rows of a CSV (with a header), TSV or JSONL file naming an image file, its caption and,
    optionally, a class label.

    Relative image paths resolve against the manifest's folder. The manifest is read once into
    lists; images are opened lazily by the decode transform. A row that cannot be parsed (a line
    that is not JSON, a CSV row with the wrong number of fields, a missing value) becomes the
    record {'corrupt': 'bad_row: ...'}, which the transforms skip and count like an undecodable
    image, instead of failing the whole manifest.

    Args:
      path: the .csv, .tsv or .jsonl file.
      image_key: the column of image paths.
      caption_key: the column of captions; None to read no captions (labelled image sets).
      label_key: a column of class labels, integers or class names; records carry its class
        index under the same name.
      class_names: the classes, indexed by label; label names must be among them. Default:
        the sorted distinct names when the labels are names, none when they are integers.
    """

    def __init__(self, path: str, image_key: str = "image", caption_key: str | None = "caption",
                 label_key: str | None = None, class_names=None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"manifest {path!r} does not exist")
        columns, rows = _read_manifest(path)
        if not rows:
            raise ValueError(f"manifest {path!r} has no rows")
        if not columns:  # a JSONL file none of whose lines is a JSON object with fields
            first = next((r for _, r in rows if isinstance(r, str)), "no row has fields")
            raise ValueError(f"manifest {path!r} has no readable rows; the first: {first}")
        keys = {image_key: "data.image_key", caption_key: "data.caption_key",
                label_key: "the evaluator's label_key"}
        keys.pop(None, None)
        missing = [k for k in keys if k not in columns]
        if missing:
            raise ValueError(f"manifest {path!r} has no column(s) {sorted(missing)}; its columns "
                             f"are {sorted(columns)} (set {' / '.join(keys[k] for k in missing)})")
        root = os.path.dirname(os.path.abspath(path))
        self._bad: dict[int, str] = {}
        self._paths, self._captions, good, label_values, label_lines = [], [], [], [], []
        for index, (line, row) in enumerate(rows):
            reason = row if isinstance(row, str) else _row_problem(row, line, keys, caption_key)
            if reason:
                self._bad[index] = f"bad_row: {reason}"
                row = {image_key: "", caption_key: ""}
            else:
                good.append(index)
                if label_key:
                    label_values.append(row[label_key])
                    label_lines.append(line)
            self._paths.append(os.path.join(root, str(row[image_key])))
            if caption_key:
                self._captions.append(str(row[caption_key]))
        if not good:
            raise ValueError(f"manifest {path!r} has no readable rows; the first: "
                             f"{self._bad[0][len('bad_row: '):]}")
        self.class_names = {}
        if label_key:
            indices, names = _class_indices(label_values, label_lines, class_names, path)
            self._labels = np.full(len(rows), -1, np.int32)
            self._labels[good] = indices
            if names is not None:
                self.class_names = {label_key: names}
        self._caption_key, self._label_key = caption_key, label_key
        self.path = path

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict:
        if index in self._bad:
            return {"corrupt": self._bad[index]}
        record = {"image_path": self._paths[index]}
        if self._caption_key:
            record["caption"] = self._captions[index]
        if self._label_key:
            record[self._label_key] = self._labels[index]
        return record

    def __repr__(self) -> str:
        return f"ManifestSource({self.path!r}, {len(self)} rows)"


def _read_manifest(path: str) -> tuple[list[str], list[tuple[int, dict | str]]]:
    """(column names, [(line number, row dict or why the line is unreadable)]). Bytes that are
    not UTF-8 survive as surrogate escapes, for the transforms to reject their caption alone."""
    rows = []
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        if path.endswith(".jsonl"):
            columns: dict = {}
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except ValueError:
                    rows.append((line, f"line {line} is not valid JSON"))
                    continue
                if not isinstance(row, dict):
                    rows.append((line, f"line {line} is not a JSON object"))
                    continue
                columns.update(dict.fromkeys(row))
                rows.append((line, row))
            return list(columns), rows
        reader = csv.DictReader(f, dialect="excel-tab" if path.endswith(".tsv") else "excel")
        for row in reader:
            rows.append((reader.line_num, row))
        return list(reader.fieldnames or ()), rows


def _row_problem(row: dict, line: int, keys, caption_key: str | None) -> str | None:
    """Why a parsed manifest row is unusable, or None (empty captions are the transforms' call)."""
    if None in row:  # csv.DictReader files surplus fields under the key None
        return f"line {line} has more fields than the header"
    for key in keys:
        value = row.get(key)
        if value is None or (key != caption_key and str(value).strip() == ""):
            return f"line {line} has no {key!r}"
    return None


def _is_integer(value) -> bool:
    """An integer, or a string of one (CSV cells are strings)."""
    if isinstance(value, str):
        return re.fullmatch(r"\s*[+-]?\d+\s*", value) is not None
    return isinstance(value, int) and not isinstance(value, bool)


def _class_indices(values, lines, class_names, path: str):
    """Label values -> (int32 class indices, class names or None). Values are class names when
    all of them are in ``class_names`` or any of them is not an integer; else class indices."""
    names = None if class_names is None else tuple(str(n) for n in class_names)
    if names is not None and len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class names must be distinct; repeated: {repeated}")
    texts = [str(v).strip() for v in values]
    if (names is None or not set(texts) <= set(names)) and all(map(_is_integer, values)):
        indices = np.array([int(v) for v in values], np.int64)
        limit = np.iinfo(np.int32).max if names is None else len(names)
        bad = np.flatnonzero((indices < 0) | (indices >= limit))
        if len(bad):
            i = int(bad[0])
            valid = "non-negative" if names is None else f"[0, {len(names)})"
            raise ValueError(f"label {values[i]!r} on line {lines[i]} of manifest {path!r} is not "
                             f"a class index: class indices are {valid}")
        return indices.astype(np.int32), names
    names = tuple(sorted(set(texts))) if names is None else names
    position = {name: i for i, name in enumerate(names)}
    for value, text, line in zip(values, texts, lines):
        if text not in position:
            raise ValueError(f"label {value!r} on line {line} of manifest {path!r} is not one of "
                             f"the {len(names)} class names: {_preview(names)}")
    return np.array([position[t] for t in texts], np.int32), names


def _preview(names, limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff",
                    ".webp")


class ImageFolderSource:
    """Labelled images in torchvision's ImageFolder layout: root/<class name>/**/<image file>.

    Records are {'image_path', 'label'} (no caption: for zero-shot classification, probes and
    image-only objectives), ordered by class, then by path.

    Args:
      root: the folder of class folders.
      class_names: the classes in label order; they must be exactly the class folders' names.
        Default: the sorted folder names.
    """

    def __init__(self, root: str, class_names=None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        folders = sorted(entry.name for entry in os.scandir(root)
                         if entry.is_dir() and not entry.name.startswith("."))
        names = tuple(folders) if class_names is None else tuple(str(n) for n in class_names)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if set(names) != set(folders) or repeated:
            raise ValueError(
                f"the class names must be the class folders of {root!r}: folders without a class "
                f"name: {sorted(set(folders) - set(names))}; class names without a folder: "
                f"{sorted(set(names) - set(folders))}"
                + (f"; repeated: {repeated}" if repeated else ""))
        self._paths, labels = [], []
        for label, name in enumerate(names):
            files = _image_files(os.path.join(root, name))
            self._paths += files
            labels += [label] * len(files)
        if not self._paths:
            raise ValueError(f"image folder {root!r} has no image files "
                             f"({', '.join(IMAGE_EXTENSIONS)}) in class folders")
        self._labels = np.array(labels, np.int32)
        self.class_names = {"label": names}
        self.root = root

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict:
        return {"image_path": self._paths[index], "label": self._labels[index]}

    def __repr__(self) -> str:
        return (f"ImageFolderSource({self.root!r}, {len(self)} images, "
                f"{len(self.class_names['label'])} classes)")


def _image_files(folder: str) -> list[str]:
    """Image files under a folder (recursively, following links), sorted by path."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(parent, f) for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


class TfdsSource:
    """A TFDS dataset prepared as ArrayRecord, read through ``tfds.data_source`` (no TF); it is
    never downloaded from here (preparing ImageNet is a job of its own)."""

    def __init__(self, name: str, split: str, data_dir: str | None, image_key: str,
                 caption_key: str):
        import tensorflow_datasets as tfds  # heavy import, only for this source

        try:  # never download or prepare from here: a run (or a dry run) only reads
            self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                            download=False)
        except Exception as e:  # tfds raises several types for "not prepared"
            raise FileNotFoundError(
                f"TFDS dataset {name!r} (split {split!r}) is not prepared as ArrayRecord under "
                f"data_dir {data_dir or '~/tensorflow_datasets'!r}; prepare it first: tfds build "
                f"{name} --file_format=array_record --data_dir=DIR ({type(e).__name__}: "
                f"{str(e).splitlines()[0]})") from e
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


class LabelledAsCaptions:
    """A labelled source whose records get a caption naming their class: one of the templates
    formatted with the class name, as CoCa trains on class labels rendered as text.

    The template is drawn from (seed, record index) alone, so a record's caption is the same
    whenever it is read (exact resume, any number of worker processes). Corrupt records pass
    through unchanged, for the pipeline to skip and count.

    Args:
      source: any source whose records carry an integer class under ``label_key``.
      class_names: the names the captions use, indexed by label.
      templates: caption templates, each with exactly one '{}' for the class name.
      label_key: the record's label field.
      seed: varies which template each record gets.
    """

    def __init__(self, source, class_names, templates, label_key: str = "label", seed: int = 0):
        self.source = source
        names = tuple(str(n) for n in class_names)
        templates = tuple(str(t) for t in templates)
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise ValueError(f"caption templates need exactly one '{{}}' each; got "
                             f"{list(bad or templates)}")
        known = getattr(source, "class_names", {}).get(label_key)
        if not names or (known is not None and len(known) != len(names)):
            raise ValueError(f"{len(names)} class names for label {label_key!r}, but the source "
                             f"has {len(known) if known else 'no'} classes")
        self.class_names = {label_key: names}
        self.templates = templates
        self._label_key, self._seed = label_key, int(seed)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        record = self.source[index]
        if "corrupt" in record:
            return record
        rng = np.random.default_rng((self._seed, int(index)))
        template = self.templates[int(rng.integers(len(self.templates)))]
        names, label = self.class_names[self._label_key], int(record[self._label_key])
        if not 0 <= label < len(names):
            raise ValueError(f"record {index} has {self._label_key} {label}, not a class index "
                             f"for {len(names)} class names")
        return {**record, "caption": template.format(names[label])}

    def __repr__(self) -> str:
        return (f"LabelledAsCaptions({self.source!r}, {len(self.templates)} templates over "
                f"{len(self.class_names[self._label_key])} classes of {self._label_key!r})")


SOURCES = ("synthetic", "manifest", "image_folder", "array_record", "tfds")


def build_source(data_config, split: str, *, captions: bool = True,
                 label_key: str | None = None, class_names=None):
    """The configured source for one split ('{split}' in paths is replaced by the split).

    captions: whether records need captions (False: a manifest may lack the caption column).
    label_key, class_names: the label field an evaluator reads and its classes; a manifest then
      reads that column as class indices, and an image folder takes its class order from
      class_names.
    """
    kind = data_config.source
    if kind == "synthetic":
        syn = data_config.synthetic
        return synthetic.SyntheticWorld(split, num_records=syn.num_records,
                                        image_size=data_config.image_size,
                                        seed=syn.seed, two_object_prob=syn.two_object_prob,
                                        grey_prob=syn.grey_prob,
                                        backgrounds=tuple(syn.backgrounds),
                                        positions=tuple(syn.positions))
    path = data_config.path.format(split=split)
    if kind == "manifest":
        return ManifestSource(path, data_config.image_key,
                              data_config.caption_key if captions else None, label_key,
                              class_names)
    if kind == "image_folder":
        if captions:
            raise ValueError(f"an image folder ({path}) has class labels but no captions: it "
                             "serves zero-shot classification, not training or retrieval (use "
                             "a manifest of captions for those)")
        if label_key not in (None, "label"):
            raise ValueError(f"image_folder records carry their class under 'label', not "
                             f"{label_key!r}")
        return ImageFolderSource(path, class_names)
    if kind == "tfds":
        return TfdsSource(data_config.tfds_name, split, data_config.path or None,
                          data_config.image_key, data_config.caption_key)
    if kind == "array_record":
        return ArrayRecordSource(path, data_config.image_key, data_config.caption_key)
    raise ValueError(f"unknown data.source {kind!r}; choose {', '.join(SOURCES)}")


def read_class_names_file(path: str) -> tuple[str, ...]:
    """Class names from a text file, one per line in label order (blank lines ignored)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no class-names file {path!r}")
    with open(path, encoding="utf-8") as f:
        names = tuple(line.strip() for line in f if line.strip())
    if not names:
        raise ValueError(f"class-names file {path!r} names no classes")
    return names


def class_names(source, label_key: str):
    """The source's class names for a label field, if it knows them (the synthetic world, an
    image folder, a manifest of named labels)."""
    return getattr(source, "class_names", {}).get(label_key)


def prompt_templates(source, label_key: str):
    """The source's zero-shot prompt templates for a label field, if its captions have their own
    wording (the synthetic world)."""
    return getattr(source, "prompt_templates", {}).get(label_key)


def num_examples(source) -> int | None:
    """Examples per epoch, or None for the synthetic world (a fresh example per index)."""
    if isinstance(source, LabelledAsCaptions):
        return num_examples(source.source)
    return None if isinstance(source, synthetic.SyntheticWorld) else len(source)

