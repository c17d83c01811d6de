"""The Qwen2.5 tokenizer (byte-level BPE from ``tokenizer.json``, run by the `tokenizers` library) and chat format."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


class WeightsError(RuntimeError):
    """Weights or tokenizer files that are missing, unreadable, incomplete, or do not match the config.

    The message names the file and the problem. Defined here, the lowest module that raises it (for
    ``tokenizer.json``); :mod:`miniqwen.loading` and :mod:`miniqwen` export the same class.
    """


class QwenTokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with the ids a Qwen2.5 user needs.

    ``encode`` adds no special tokens (Qwen adds none: no BOS), matching ``AutoTokenizer(...)(text)`` of
    transformers. ``eos_token_id`` is ``<|im_end|>`` (end of a chat turn, the Instruct models' EOS) and
    ``pad_token_id`` is ``<|endoftext|>``, as in Qwen2.5's ``tokenizer_config.json``.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.backend = tokenizer
        self.eos_token_id = self._special_id(IM_END)
        self.pad_token_id = self._special_id(END_OF_TEXT)

    def _special_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {token} token: is this a Qwen2/Qwen2.5 tokenizer.json?")
        return token_id

    @classmethod
    def from_file(cls, path: str | Path) -> "QwenTokenizer":
        """Load ``tokenizer.json`` (a file, or a directory containing it).

        Raises:
            WeightsError: naming the file, when it is missing, is not a valid `tokenizers` JSON file (not JSON,
                ``{}``, garbage …), or lacks Qwen's special tokens ``<|im_end|>`` / ``<|endoftext|>``.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise WeightsError(f"{path}: no tokenizer.json")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust binding raises a bare Exception for every parse/IO problem
            raise WeightsError(f"{path}: not a valid tokenizer.json ({err})") from None
        try:
            return cls(backend)
        except ValueError as err:
            raise WeightsError(f"{path}: {err}") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token strings such as ``<|im_start|>`` become their single ids)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` for many texts at once (parallel in the Rust backend)."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or 1-D tensor of ints)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry, or None."""
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of entries including special tokens (may be < the model's padded ``vocab_size``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)


def chat_prompt(user: str, system: str | None = DEFAULT_SYSTEM) -> str:
    """The Qwen chat format (ChatML) for one user turn, ready for the assistant to answer::

        <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n

    Same text as Qwen2.5's ``chat_template.jinja`` with ``add_generation_prompt=True`` and no tools; with
    ``system=None`` the default Qwen system message is used, as the template does.
    """
    system = DEFAULT_SYSTEM if system is None else system
    return (
        f"{IM_START}system\n{system}{IM_END}\n"
        f"{IM_START}user\n{user}{IM_END}\n"
        f"{IM_START}assistant\n"
    )
