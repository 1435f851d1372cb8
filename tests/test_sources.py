"""Manifests with label columns and unreadable rows, image folders, and what build_source makes
of each."""

import numpy as np
import pytest
from PIL import Image

from big_contrast import config as bc
from big_contrast.data import sources
from big_contrast.evaluators import common
from tests.labelled_data import write_labelled_set


def _png(path, rgb=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), rgb, np.uint8)).save(path)


def test_unreadable_manifest_rows_become_corrupt_records_and_the_rest_reads(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"image": "a.png", "caption": "a red square"}\n'
                     b'{"image": "b.png", "caption": "cut off\n'
                     b'\n'
                     b'["c.png", "a list"]\n'
                     b'{"image": "d.png"}\n'
                     b'{"image": "e.png", "caption": "caf\xe9 au lait"}\n')
    source = sources.ManifestSource(str(path))
    assert len(source) == 5  # the blank line is no row
    assert source[0] == {"image_path": str(tmp_path / "a.png"), "caption": "a red square"}
    assert source[1] == {"corrupt": "bad_row: line 2 is not valid JSON"}
    assert source[2] == {"corrupt": "bad_row: line 4 is not a JSON object"}
    assert source[3] == {"corrupt": "bad_row: line 5 has no 'caption'"}
    # A byte that is not UTF-8 survives as a surrogate escape, for the transforms to reject.
    assert source[4]["caption"] == "caf\udce9 au lait"


def test_csv_rows_with_the_wrong_number_of_fields_are_corrupt(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"\xef\xbb\xbf"  # a byte-order mark, as spreadsheets write
                     b'image,caption\na.png,a red square\nb.png,a red, square\nc.png\n'
                     b'd.png,"a caption\nover two lines"\ne.png,caf\xe9\n')
    source = sources.ManifestSource(str(path))
    assert [source[i].get("corrupt") for i in range(5)] == [
        None, "bad_row: line 3 has more fields than the header", "bad_row: line 4 has no 'caption'",
        None, None]
    assert source[3]["caption"] == "a caption\nover two lines"
    assert source[4]["caption"] == "caf\udce9"


def test_a_manifest_of_only_unreadable_rows_is_an_error(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("{oops\n")
    with pytest.raises(ValueError, match="no readable rows; the first: line 1 is not valid JSON"):
        sources.ManifestSource(str(path))


def test_tsv_label_names_become_sorted_class_indices(tmp_path):
    path = tmp_path / "pets.tsv"
    path.write_text("image\tcaption\tbreed\n"
                    "1.png\tx\tpug\n2.png\tx\t beagle \n3.png\tx\tpug\n4.png\tx\t\n")
    source = sources.ManifestSource(str(path), label_key="breed")
    assert sources.class_names(source, "breed") == ("beagle", "pug")
    assert [source[i].get("breed") for i in range(3)] == [1, 0, 1]
    assert source[3] == {"corrupt": "bad_row: line 5 has no 'breed'"}


def test_label_names_follow_the_given_class_list(tmp_path):
    path = tmp_path / "pets.csv"
    path.write_text("image,label\n1.png,pug\n2.png,beagle\n")
    source = sources.ManifestSource(str(path), caption_key=None, label_key="label",
                                    class_names=["pug", "collie", "beagle"])
    assert source[1] == {"image_path": str(tmp_path / "2.png"), "label": 2}
    assert source.class_names == {"label": ("pug", "collie", "beagle")}


def test_integer_labels_are_class_indices_and_digit_names_are_names(tmp_path):
    path = tmp_path / "digits.jsonl"
    path.write_text('{"image": "a.png", "y": 2}\n{"image": "b.png", "y": "0"}\n')
    plain = sources.ManifestSource(str(path), caption_key=None, label_key="y")
    assert [plain[i]["y"] for i in range(2)] == [2, 0] and plain.class_names == {}
    named = sources.ManifestSource(str(path), caption_key=None, label_key="y",
                                   class_names=["zero", "one", "two"])
    assert [named[i]["y"] for i in range(2)] == [2, 0]
    # Class names that are digits ("the class folder '7'") are looked up as names.
    digits = sources.ManifestSource(str(path), caption_key=None, label_key="y",
                                    class_names=["2", "0"])
    assert [digits[i]["y"] for i in range(2)] == [0, 1]


@pytest.mark.parametrize("labels, class_names, message", [
    (["pug", "dgo"], ["pug", "dog"],
     r"label 'dgo' on line 3 of manifest '.*' is not one of the 2 class names: 'pug', 'dog'"),
    (["1", "5"], ["a", "b"], r"label '5' on line 3 of manifest '.*' is not a class index: "
                             r"class indices are \[0, 2\)"),
    (["1", "-1"], None, r"label '-1' on line 3 .* class indices are non-negative"),
    (["pug", "pug"], ["pug", "dog", "pug"], r"class names must be distinct; repeated: \['pug'\]"),
])
def test_bad_labels_name_the_value_and_the_row(tmp_path, labels, class_names, message):
    path = tmp_path / "pets.csv"
    path.write_text("image,label\n" + "".join(f"{i}.png,{x}\n" for i, x in enumerate(labels)))
    with pytest.raises(ValueError, match=message):
        sources.ManifestSource(str(path), caption_key=None, label_key="label",
                               class_names=class_names)


def test_a_missing_label_column_names_the_columns_found(tmp_path):
    path = tmp_path / "pets.csv"
    path.write_text("image,caption,breed\n1.png,x,pug\n")
    message = (r"no column\(s\) \['label'\]; its columns are \['breed', 'caption', 'image'\] "
               r"\(set the evaluator's label_key\)")
    with pytest.raises(ValueError, match=message):
        sources.ManifestSource(str(path), label_key="label")


def test_image_folder_classes_are_sorted_folders_or_the_given_list(tmp_path):
    for path in ("val/tabby/1.png", "val/tabby/more/2.PNG", "val/pug/3.jpg", "val/pug/.hidden.png",
                 "val/pug/notes.txt", "val/.cache/4.png"):
        if path.endswith((".png", ".PNG", ".jpg")):
            _png(tmp_path / path)
        else:
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text("x")
    data = bc.base_config().data
    data.update({"source": "image_folder", "path": str(tmp_path / "{split}")})
    source = sources.build_source(data, "val", captions=False, label_key="label")
    assert sources.class_names(source, "label") == ("pug", "tabby")
    assert [source[i] for i in range(len(source))] == [
        {"image_path": str(tmp_path / "val/pug/3.jpg"), "label": 0},
        {"image_path": str(tmp_path / "val/tabby/1.png"), "label": 1},
        {"image_path": str(tmp_path / "val/tabby/more/2.PNG"), "label": 1}]
    ordered = sources.ImageFolderSource(str(tmp_path / "val"), class_names=["tabby", "pug"])
    assert [int(ordered[i]["label"]) for i in range(3)] == [0, 0, 1]
    with pytest.raises(ValueError, match=r"under 'label', not 'breed'"):
        sources.build_source(data, "val", captions=False, label_key="breed")
    with pytest.raises(ValueError, match=r"has class labels but no captions"):
        sources.build_source(data, "val")  # e.g. as training data for an image-text model
    with pytest.raises(FileNotFoundError, match="image folder '.*/test' does not exist"):
        sources.build_source(data, "test", captions=False)
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no image files"):
        sources.ImageFolderSource(str(tmp_path / "empty"))


def test_evaluation_examples_skip_corrupt_rows_and_keep_labels(tmp_path):
    labelled = write_labelled_set(tmp_path, per_class=2)
    with open(labelled["manifest"], "a", encoding="utf-8") as f:
        f.write("missing.png,red\nred/000.png\n")  # an image that is not there; a short row
    source = sources.ManifestSource(labelled["manifest"], caption_key=None, label_key="label")
    examples = common.load_examples(source, 16, 100, labels=("label",))
    assert examples["image"].shape == (8, 16, 16, 3)
    assert sorted(examples["label"].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_an_unprepared_tfds_dataset_is_never_downloaded_and_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build imagenet2012 --file_format=array_record"):
        sources.TfdsSource("imagenet2012", "train", str(tmp_path), "image", "label")
    assert not any(tmp_path.iterdir())  # nothing downloaded or prepared
