"""Tokenizers: HF ``AutoTokenizer`` from a local directory, and the demo's character tokenizer.

The demo tokenizer is an ordinary HF fast tokenizer (one token per printable ASCII character plus
``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``, with a small chat template), saved in the HF format,
so the demo and real checkpoints share one loading path: ``load_tokenizer(directory)``.
"""

from __future__ import annotations

import os
import pathlib
import string

from jaxgrpo import paths

DEMO_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Printable ASCII: space, newline, digits, letters, punctuation (no tab/CR/form feeds).
DEMO_CHARACTERS = " \n" + string.digits + string.ascii_letters + string.punctuation
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
SHIPPED_DEMO_TOKENIZER = pathlib.Path(__file__).resolve().parents[1] / "assets" / "demo_tokenizer"


def load_tokenizer(path: os.PathLike | str):
    """``transformers.AutoTokenizer`` from a local directory (no hub access)."""
    import transformers

    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"{directory} has neither tokenizer.json nor tokenizer_config.json")
    return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def build_demo_tokenizer(path: os.PathLike | str | None = None):
    """Build the character-level demo tokenizer; save it in HF format under ``path`` if given.

    ``path`` may be a URI (``gs://bucket/run/tokenizer``): ``save_pretrained`` writes a local
    staging directory that is then copied there (``jaxgrpo.paths.local_dir``).

    Token ids: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, then one id per character of
    ``DEMO_CHARACTERS`` in order. Offsets (``return_offsets_mapping=True``) are character spans.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    import tokenizers
    import transformers
    from tokenizers import decoders, models

    vocab = {tok: i for i, tok in enumerate(DEMO_SPECIAL_TOKENS)}
    for ch in DEMO_CHARACTERS:
        vocab[ch] = len(vocab)
    # A BPE with no merges over single characters is an exact character tokenizer; with no
    # pre-tokenizer, spaces and newlines are ordinary characters.
    core = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(DEMO_SPECIAL_TOKENS))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", chat_template=DEMO_CHAT_TEMPLATE, padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    if path is not None:
        with paths.local_dir(path) as directory:
            tok.save_pretrained(str(directory))
    return tok
