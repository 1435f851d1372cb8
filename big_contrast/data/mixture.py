"""The order of training records: one source, or a weighted mixture of sources (e.g. alt-text
pairs beside class labels rendered as captions, as CoCa trains), each shuffled per epoch and
repeated forever. Record k of the stream is a pure function of (seed, k), so a saved position
resumes exactly and every process slices the same global stream.

A mixture is configured as ``data.mixture.<name> = {weight, source settings...}``: settings it
does not give are data.<key>'s. A part with a ``label_key`` has its class names rendered as
captions through templates. An empty ``data.mixture`` means data.source alone.
"""

from __future__ import annotations

import math

import grain
import ml_collections
import numpy as np

from big_contrast.config import ConfigError, closest_suggestion
from big_contrast.data import sources

# Settings of one part that replace data.<key> (synthetic: some of data.synthetic's keys).
SOURCE_KEYS = ("source", "path", "tfds_name", "image_key", "caption_key", "synthetic")
# A labelled part: its label field, the names its captions give the classes (default: the
# source's names) and the caption templates (default: the source's own prompts, if it has any).
LABEL_KEYS = ("label_key", "class_names", "class_names_file", "templates")
ENTRY_KEYS = ("weight",) + SOURCE_KEYS + LABEL_KEYS

# Mixed records are shuffled within windows of this many, so that each process's slice and each
# batch draws from every part in proportion (grain's weighted interleave alone is periodic: with
# equal weights and two processes, each process would read a single part).
SHUFFLE_WINDOW = 10_000


class Mixture:
    """Named training sources, drawn in proportion to their weights."""

    def __init__(self, parts: dict, weights: dict):
        self.parts, self.weights = dict(parts), {k: float(weights[k]) for k in parts}

    def __repr__(self) -> str:
        return "Mixture(" + ", ".join(f"{name}: {self.weights[name]:g} x {part!r}"
                                      for name, part in self.parts.items()) + ")"


def _is_mapping(value) -> bool:
    return isinstance(value, (dict, ml_collections.ConfigDict))


def check(data_config) -> None:
    """Raises ConfigError for the first data.mixture entry the pipeline cannot use (reads no
    files: missing paths and class-name files are found when the sources are built)."""
    for name, entry in data_config.mixture.items():
        where = f"data.mixture.{name}"
        if not _is_mapping(entry):
            raise ConfigError(f"{where} must be a dict of source settings with a weight, "
                              f"got {entry!r}")
        for key in entry:
            if key not in ENTRY_KEYS:
                raise ConfigError(f"unknown key '{where}.{key}'"
                                  f"{closest_suggestion(key, ENTRY_KEYS)}; keys: "
                                  f"{', '.join(ENTRY_KEYS)}")
        weight = entry.get("weight")
        if (isinstance(weight, bool) or not isinstance(weight, (int, float))
                or not math.isfinite(weight) or weight <= 0):
            raise ConfigError(f"{where}.weight must be a number > 0 (the part's share of the "
                              f"records, relative to the other parts'), got {weight!r}")
        _check_source_settings(where, entry, data_config)
        _check_label_settings(where, entry, entry.get("source", data_config.source))


def _check_source_settings(where: str, entry, data_config) -> None:
    for key in SOURCE_KEYS:
        if key not in entry:
            continue
        if key == "synthetic" and not _is_mapping(entry[key]):
            raise ConfigError(f"{where}.synthetic must be a dict of data.synthetic keys, got "
                              f"{entry[key]!r}")
        if key != "synthetic" and not isinstance(entry[key], str):
            raise ConfigError(f"{where}.{key} must be a string (as data.{key}), got "
                              f"{entry[key]!r}")
    source = entry.get("source", data_config.source)
    if source not in sources.SOURCES:
        raise ConfigError(f"{where}.source is {source!r}"
                          f"{closest_suggestion(source, sources.SOURCES)}; choose one of: "
                          f"{', '.join(sources.SOURCES)}")
    for key in entry.get("synthetic", {}):
        if key not in data_config.synthetic:
            raise ConfigError(f"unknown key '{where}.synthetic.{key}'"
                              f"{closest_suggestion(key, data_config.synthetic)}; keys: "
                              f"{', '.join(data_config.synthetic)}")


def _check_label_settings(where: str, entry, source: str) -> None:
    label_key = entry.get("label_key")
    if label_key is None:
        given = [key for key in LABEL_KEYS[1:] if entry.get(key) is not None]
        if given:
            raise ConfigError(f"{where}.{given[0]} needs {where}.label_key, the record field "
                              "whose class names the captions give")
        if source == "image_folder":
            raise ConfigError(f"{where} is an image folder, with labels but no captions: set "
                              f"{where}.label_key='label' and {where}.templates to caption its "
                              "class names")
        return
    if not isinstance(label_key, str) or not label_key:
        raise ConfigError(f"{where}.label_key must be a field name, got {label_key!r}")
    names = entry.get("class_names")
    if names is not None and entry.get("class_names_file") is not None:
        raise ConfigError(f"{where}: set class_names or class_names_file, not both")
    if names is not None and (isinstance(names, str) or not names):
        raise ConfigError(f"{where}.class_names must be a list of names, got {names!r}")
    templates = entry.get("templates")
    if templates is not None and (
            isinstance(templates, str) or not templates
            or any(not isinstance(t, str) or t.count("{}") != 1 for t in templates)):
        raise ConfigError(f"{where}.templates must be a list of strings with exactly one '{{}}' "
                          f"each (for the class name), got {templates!r}")


def build_train_source(data_config, *, captions: bool = True, seed: int = 0):
    """The training split's records: a Mixture of the data.mixture parts, or data.source's
    source when the mixture is empty. captions: whether unlabelled parts need captions; seed:
    which template each labelled record gets."""
    split = data_config.train_split
    if not data_config.mixture:
        return sources.build_source(data_config, split, captions=captions)
    check(data_config)
    parts = {}
    for name, entry in data_config.mixture.items():
        try:
            parts[name] = _build_part(data_config, entry, split, captions, seed)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"data.mixture.{name}: {e}") from None
    return Mixture(parts, {name: entry["weight"] for name, entry in data_config.mixture.items()})


def _build_part(data_config, entry, split: str, captions: bool, seed: int):
    """One part's source: data_config with the entry's settings, captioned from its labels if
    it has a label_key."""
    settings = ml_collections.ConfigDict(data_config.to_dict())
    settings.update({key: entry[key] for key in SOURCE_KEYS
                     if key in entry and key != "synthetic"})
    settings.synthetic.update(dict(entry.get("synthetic", {})))
    label_key = entry.get("label_key")
    if label_key is None:
        return sources.build_source(settings, split, captions=captions)
    names = _configured_class_names(entry)
    source = sources.build_source(settings, split, captions=False, label_key=label_key,
                                  class_names=names)
    names = names or sources.class_names(source, label_key)
    if not names:
        raise ValueError(f"the source names no classes for {label_key!r}: set class_names or "
                         "class_names_file")
    templates = entry.get("templates") or sources.prompt_templates(source, label_key)
    if not templates:
        raise ValueError(f"set templates (e.g. ['a photo of a {{}}.']): the source has no "
                         f"prompts of its own for {label_key!r}")
    return sources.LabelledAsCaptions(source, names, templates, label_key, seed)


def _configured_class_names(entry):
    """The entry's class names (a list, or a file of one name per line), or None."""
    path = entry.get("class_names_file")
    if path is not None:
        return sources.read_class_names_file(path)
    names = entry.get("class_names")
    return None if names is None else tuple(str(n) for n in names)


def _subseed(seed: int, index: int) -> int:
    """A seed for one piece of the mixture, independent of the others'. Below 2**31: the window
    shuffle adds each window's index to its seed, and index_shuffle takes uint32 seeds."""
    return int(np.random.SeedSequence((seed, index)).generate_state(1)[0]) >> 1


def records(source, seed: int, shuffle: bool = True) -> grain.MapDataset:
    """The endless training stream before preprocessing: the source's records in a seeded order,
    reshuffled each epoch; for a Mixture, its parts' streams interleaved by weight (grain's
    MapDataset.mix) and shuffled within windows of SHUFFLE_WINDOW records."""
    if not isinstance(source, Mixture):
        ds = grain.MapDataset.source(source).seed(seed)
        if shuffle:
            ds = ds.shuffle()
        return ds.repeat(None)
    parts = [records(part, _subseed(seed, i), shuffle)
             for i, part in enumerate(source.parts.values())]
    mixed = grain.MapDataset.mix(parts, list(source.weights.values()))
    if not shuffle:
        return mixed
    return grain.experimental.WindowShuffleMapDataset(
        mixed, window_size=SHUFFLE_WINDOW, seed=_subseed(seed, len(parts)))


def num_examples(source) -> int | None:
    """Records in one pass over the source (over every part of a mixture), or None when there
    is no such pass (the synthetic world makes a fresh record per index)."""
    if not isinstance(source, Mixture):
        return sources.num_examples(source)
    sizes = [sources.num_examples(part) for part in source.parts.values()]
    return None if None in sizes else sum(sizes)
