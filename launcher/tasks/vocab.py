"""Tokenizers built from the training data, for models initialised from a config rather than pretrained."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def char_tokenizer(sentences: Iterable[list[str]], min_count: int = 1):
    """A BERT-style character-level tokenizer: every character seen `min_count` times is one token.

    For languages a pretrained vocabulary lacks (e.g. Chinese NER on characters). Ids are ordered by frequency,
    then by character, so every rank building it from the same data gets the same ids. Each word is split into
    its characters, so `is_split_into_words` input gives one token per character."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # Whitespace separates words and is no token (a text may be a string: its words are then its characters).
    counts = Counter(ch for words in sentences for word in words for ch in word if not ch.isspace())
    chars = sorted(
        (c for c, n in counts.items() if n >= min_count and c not in SPECIALS), key=lambda c: (-counts[c], c)
    )
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
    )
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


def check_setting(tokenizer: str, model_init: str) -> None:
    """The `tokenizer` and `model_init` settings of an encoder recipe (lora_cls, lora_ner), checked together."""
    import os

    from launcher.errors import ConfigError

    if tokenizer not in ("auto", "chars") and not os.path.isdir(tokenizer):
        raise ConfigError(f"tokenizer={tokenizer}: use auto, chars or a tokenizer folder")
    if tokenizer == "chars" and model_init == "pretrained":
        raise ConfigError(
            "tokenizer=chars with model_init=pretrained: the pretrained embeddings belong to the model's own "
            "vocabulary; use model_init=config (and adapter=full) or tokenizer=auto"
        )


def encoder_tokenizer(cfg, texts: Callable[[], Iterable]):
    """An encoder recipe's tokenizer (its `tokenizer` setting): chars builds one from `texts()` (every text of the
    training file, not only of the rows trained on: the same vocabulary whatever data.max_train_rows says); auto
    loads the model's; else the folder the setting names."""
    from transformers import AutoTokenizer

    if cfg.tokenizer == "chars":
        return char_tokenizer(texts())
    return AutoTokenizer.from_pretrained(cfg.tokenizer if cfg.tokenizer != "auto" else cfg.model_path)


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


def learnt_tokenizer(cfg, build: Callable[[], object]):
    """The tokenizer `build()` learns from the training data, built once per node (file lock, see launcher.data.cache)
    and read by every rank: all ranks get byte-identical vocabularies, and the next run reuses it (which keeps the
    tokenized-data cache valid). Its key is the tokenized data's, split aside: the training file's content, every
    setting that may shape tokenization and the recipe file. With data.cache=false it is simply built."""
    from transformers import AutoTokenizer

    from launcher.data import cache as datacache
    from launcher.data.files import scratch_active
    from launcher.data.tokenize import cache_key

    if not cfg.data.cache or scratch_active():  # a dry run keeps nothing
        return build()
    key = {"learnt_tokenizer": cache_key(cfg, split="train", rows=None, tokenizer=None)}
    entry = datacache.cached(
        key,
        lambda: (build(), []),
        cfg.data.cache_dir or datacache.default_dir(),
        save=lambda tok, folder: tok.save_pretrained(folder),
        load=AutoTokenizer.from_pretrained,
        wait_message="building the tokenizer",
    )
    return entry.table
