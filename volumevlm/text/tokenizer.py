"""A BERT-style uncased WordPiece tokenizer trained on report texts.

The text tower of a model trained from scratch reads reports through a WordPiece
vocabulary learned from the TRAINING reports only (the datamodule calls
:func:`build_wordpiece_tokenizer` on the train split). The result is an ordinary
Hugging Face fast tokenizer: ``save_pretrained(dir)`` writes it and
``transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)`` reads it
back, so a checkpoint needs no volumevlm code to tokenize text.
"""

from __future__ import annotations

from collections.abc import Sequence

from volumevlm.errors import VolumeVLMError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
# Order fixes the ids: [PAD] = 0 so zero-filled id tensors read as padding.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK)
SUBWORD_PREFIX = "##"


def as_text_list(texts, what: str) -> list[str]:
    """``texts`` as a list of strings, or a one-line VolumeVLMError naming ``what``."""
    if isinstance(texts, str):
        raise VolumeVLMError(f"{what}: expected a list of strings, got one string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise VolumeVLMError(f"{what}: item {i} is {type(text).__name__}, not a string")
    return texts


def build_wordpiece_tokenizer(texts: Sequence[str], vocab_size: int = 4096, min_frequency: int = 1):
    """Train an uncased WordPiece tokenizer on ``texts`` and wrap it for transformers.

    texts: report strings (at least one non-blank). vocab_size: the largest vocabulary
    (special tokens included); a small corpus yields fewer entries. min_frequency: a
    merge must occur at least this often to enter the vocabulary.

    Returns a ``transformers.PreTrainedTokenizerFast`` with [PAD]=0, [UNK], [CLS],
    [SEP], [MASK]; encoding a text gives ``[CLS] ... [SEP]`` ids (python ints). The same
    texts and settings always give the same vocabulary. Raises VolumeVLMError (one
    line) for empty input, non-string items or a vocabulary too small to hold the
    special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = as_text_list(texts, "tokenizer training texts")
    if not any(text.strip() for text in texts):
        raise VolumeVLMError("tokenizer training texts: no non-empty text to train the WordPiece vocabulary on")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise VolumeVLMError(f"tokenizer vocab_size: must be an integer above {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 0:
        raise VolumeVLMError(f"tokenizer min_frequency: must be a non-negative integer, got {min_frequency!r}")

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()

    # tokenizers' trainer numbers the "##x" tokens in hash-map order, and merge ties are
    # broken by token id, so the same corpus can give different vocabularies
    # (huggingface/tokenizers#1794). Registering every "##x" up front, in sorted order,
    # fixes their ids and so makes training reproducible.
    continuations = sorted(_continuation_chars(texts, normalizer, pre_tokenizer))
    scaffold = [f"{SUBWORD_PREFIX}{ch}" for ch in continuations]
    trainer = trainers.WordPieceTrainer(
        vocab_size=max(vocab_size, len(SPECIAL_TOKENS) + len(scaffold)),
        min_frequency=min_frequency,
        special_tokens=[*SPECIAL_TOKENS, *scaffold],
        continuing_subword_prefix=SUBWORD_PREFIX,
        show_progress=False,
    )
    trained = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix=SUBWORD_PREFIX))
    trained.normalizer = normalizer
    trained.pre_tokenizer = pre_tokenizer
    trained.train_from_iterator(texts, trainer=trainer, length=len(texts))

    # Rebuild from the learned vocabulary so that only the five real special tokens are
    # "special" (the scaffold "##x" entries must stay ordinary subwords).
    vocab = trained.get_vocab(with_added_tokens=False)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix=SUBWORD_PREFIX))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = tok.token_to_id(CLS), tok.token_to_id(SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix=SUBWORD_PREFIX)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        cls_token=CLS,
        sep_token=SEP,
        mask_token=MASK,
        padding_side="right",
    )


def _continuation_chars(texts: Sequence[str], normalizer, pre_tokenizer) -> set[str]:
    """Characters that occur after the first position of some pre-tokenized word: the
    ones the trainer gives a "##x" token."""
    chars: set[str] = set()
    for text in texts:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            chars.update(word[1:])
    return chars
