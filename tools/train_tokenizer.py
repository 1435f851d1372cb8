"""Trains a SentencePiece tokenizer on the captions of any configured source.

  python tools/train_tokenizer.py --config configs/clip.py:demo --vocab_size 2000 \
      --output /tmp/captions.model [--split train] [--max_captions 200000]

The model reserves ids 0/1/2 for PAD/BOS/EOS, the layout every big_contrast tokenizer uses;
point a config at it with --config.text.tokenizer=sentencepiece --config.text.model_path=...
"""

from __future__ import annotations

import argparse
import io
import itertools

import sentencepiece as spm

from big_contrast import config as config_lib
from big_contrast.data import sources, transforms


def captions(source, limit: int):
    """The source's usable captions (rows that are corrupt or whose caption is empty or not
    UTF-8 are left out)."""
    for index in range(min(len(source), limit)):
        record = source[index]
        try:
            if "corrupt" not in record:
                yield transforms.clean_caption(record.get("caption", ""))
        except transforms.CorruptRecordError:
            continue


def train(caption_iter, output: str, vocab_size: int, model_type: str = "unigram") -> None:
    """Writes <output> (a .model file) trained on the captions."""
    if not output.endswith(".model"):
        raise ValueError(f"--output should end in .model, got {output!r}")
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_iter), model_writer=proto, vocab_size=vocab_size,
        model_type=model_type, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        character_coverage=1.0, hard_vocab_limit=False)
    with open(output, "wb") as f:
        f.write(proto.getvalue())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe whose data.* names the source")
    parser.add_argument("--output", required=True, help="where to write the .model file")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--split", default="train")
    parser.add_argument("--max_captions", type=int, default=200_000)
    parser.add_argument("--model_type", default="unigram", choices=["unigram", "bpe"])
    args = parser.parse_args()
    config = config_lib.load_config_file(args.config)
    source = sources.build_source(config.data, args.split)
    texts = list(itertools.islice(captions(source, args.max_captions), args.max_captions))
    train(texts, args.output, args.vocab_size, args.model_type)
    print(f"wrote {args.output} (vocabulary {args.vocab_size}, from {len(texts):,} captions "
          f"of {source!r})")


if __name__ == "__main__":
    main()
