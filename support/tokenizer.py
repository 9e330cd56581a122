"""Qwen2's tokenizer: a byte-level BPE built with the `tokenizers` library, with Qwen2's pipeline and
special tokens. support/loading.py reads it from a model folder's files; a model built from scratch
(support/training.py's build_scratch) trains a small one (train_tokenizer)."""


# Qwen2's pre-tokenizer: contractions, letters with one leading non-letter, single digits, punctuation
# runs, newlines, and whitespace runs (a trailing space stays with the next word).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


def qwen2_pipeline(tok):
    """Qwen2's text handling around a BPE model: NFC, its split pattern, byte-level mapping and decoding."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts, vocab_size):
    """A small byte-level BPE with Qwen2's pipeline and special tokens (ids 0, 1, 2), for tiny models.

    Qwen2's pattern already splits numbers into single digits, so counts stay one token per digit.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tok = qwen2_pipeline(HFTokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok)


class TokenizerMismatch(ValueError):
    """Tokenizer files whose special tokens are not where Qwen2 has them."""


class Tokenizer:
    """Qwen2's byte-level BPE: a `tokenizers.Tokenizer` with Qwen2's pipeline and special tokens.

    Built from `tokenizer.json` text (`from_json`) or from the vocabulary and merges of the slow-
    tokenizer files (`from_vocab`); support/loading.py's load_tokenizer reads them from a model folder.
    """

    def __init__(self, tok):
        self.tok = tok
        for text, expected in SPECIAL_TOKENS.items():
            got = tok.token_to_id(text)
            if got is not None and got != expected and tok.get_vocab_size() > expected:
                raise TokenizerMismatch(f"token {text} has id {got}, Qwen2 expects {expected}")

    @classmethod
    def from_json(cls, text):
        """From the contents of a `tokenizer.json`."""
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(text))

    @classmethod
    def from_vocab(cls, vocab, merges, specials=SPECIAL_TOKENS):
        """From `vocab.json`'s {token: id}, `merges.txt`'s pairs and the special tokens {text: id}."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models

        tok = qwen2_pipeline(HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                                     byte_fallback=False)))
        for text, _ in sorted(specials.items(), key=lambda kv: kv[1]):
            tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        return cls(tok)

    def __len__(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        """Ids of template text: special-token strings such as `<|im_end|>` become their control ids."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_text(self, text):
        """Ids of user text: special-token strings are encoded as the characters they are, so typed text
        can never close a turn or open a new one. Ordinary text gets the same ids as `encode`."""
        self.tok.encode_special_tokens = True
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = False

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, text):
        return self.tok.token_to_id(text)
