"""Tokenizers built from the training data, for models initialised from a config rather than pretrained."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def char_tokenizer(sentences: Iterable[list[str]], min_count: int = 1):
    """A BERT-style character-level tokenizer: every character seen `min_count` times is one token.

    For languages a pretrained vocabulary lacks (e.g. Chinese NER on characters). Ids are ordered by frequency,
    then by character, so every rank building it from the same data gets the same ids. Each word is split into
    its characters, so `is_split_into_words` input gives one token per character."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    counts = Counter(ch for words in sentences for word in words for ch in word)
    chars = sorted(
        (c for c, n in counts.items() if n >= min_count and c not in SPECIALS), key=lambda c: (-counts[c], c)
    )
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


BPE_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2/Llama-3 style) trained on `texts`, with <pad>, <unk>, <s>, </s>.

    For causal LMs built from a config: no hub, so the vocabulary is learnt from the training data. Byte-level,
    so any text encodes without unknown tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=BPE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def cached_tokenizer(key: dict, build, cache_dir: str):
    """A tokenizer built once per node (file lock, see launcher.data.cache) and read by every rank: all ranks get
    byte-identical vocabularies, and the next run reuses it (which keeps the tokenized-data cache valid)."""
    from transformers import AutoTokenizer

    from launcher.data import cache as datacache

    entry = datacache.cached(
        key,
        lambda: (build(), []),
        cache_dir,
        save=lambda tok, folder: tok.save_pretrained(folder),
        load=AutoTokenizer.from_pretrained,
        wait_message="building the tokenizer",
    )
    return entry.table
