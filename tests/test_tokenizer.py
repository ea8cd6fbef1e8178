"""Tests for tokenizer.py's prompt encoding: BOS exactly where a Hugging Face tokenizer puts
it (its post-processor, or add_bos_token in tokenizer_config.json), never in corpus text; and
the files beside tokenizer.json read with one-line errors (pipes, ids of the wrong type)."""
import json
import os
import re

import pytest
from tokenizers import Tokenizer as HF
from tokenizers import models, pre_tokenizers, processors

from harness.tokenizer import load_tokenizer, tiktoken_tokenizer

WORDS = ["<|startoftext|>", "<|endoftext|>", "the", "needle", "is", "here"]


def make_tokenizer(path, post_processor: bool, add_bos_token: bool | None) -> str:
    """A word-level tokenizer.json with LLaDA's BOS and EOS strings as special tokens."""
    hf = HF(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(WORDS[:2])
    if post_processor:
        hf.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A",
                                                          special_tokens=[("<|startoftext|>", 0)])
    os.makedirs(path, exist_ok=True)
    hf.save(os.path.join(path, "tokenizer.json"))
    if add_bos_token is not None:
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"add_bos_token": add_bos_token,
                       "bos_token": {"content": "<|startoftext|>"}}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"eos_token_id": 1, "mask_token_id": 5, "vocab_size": 6}, f)
    return str(path)


@pytest.mark.parametrize("post_processor, add_bos_token, bos_expected", [
    (True, None, True),  # the post-processor inserts BOS
    (False, True, True),  # tokenizer_config.json asks for it (Llama-style)
    (True, True, True),  # both: still one BOS
    (False, False, False), (False, None, False),  # neither: no BOS
])
def test_prompts_start_with_bos_exactly_when_the_tokenizer_asks_for_it(
        tmp_path, post_processor, add_bos_token, bos_expected):
    tok = load_tokenizer(make_tokenizer(tmp_path / "t", post_processor, add_bos_token))
    body = [2, 3, 4, 5]  # "the needle is here"
    expected = ([0] if bos_expected else []) + body
    assert tok.encode_prompt("the needle is here") == expected
    assert tok.encode("the needle is here") == body  # corpus text: never a BOS
    assert tok.bos_id == (0 if bos_expected else None)  # what perplexity puts before a document


def test_tiktoken_prompts_have_no_bos():
    tok = tiktoken_tokenizer()
    assert tok.encode_prompt("Hello world") == tok.encode("Hello world")
    assert tok.bos_id is None


def test_a_broken_tokenizer_config_is_a_one_line_error_naming_it(tmp_path):
    path = make_tokenizer(tmp_path / "t", False, True)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(path)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "config.json"])
def test_a_named_pipe_beside_the_tokenizer_is_refused_instead_of_blocking(tmp_path, name):
    path = make_tokenizer(tmp_path / "t", False, True)
    os.remove(os.path.join(path, name))
    os.mkfifo(os.path.join(path, name))  # reading it would wait for a writer forever
    with pytest.raises(ValueError, match=f"{name} is a named pipe, not a regular file"):
        load_tokenizer(path)


@pytest.mark.parametrize("edit, says", [
    ({"mask_token_id": "5"}, "mask_token_id is '5', not a token id"),
    ({"eos_token_id": True}, "eos_token_id is True, not a token id"),
    ({"vocab_size": 3}, "vocab_size 3 does not cover EOS 1 and [MASK] 5"),
])
def test_special_ids_of_the_wrong_type_are_refused_when_read(tmp_path, edit, says):
    """A [MASK] id given as a string would otherwise be compared with the model's int and
    reported as a mismatch of two equal-looking numbers."""
    path = make_tokenizer(tmp_path / "t", False, None)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config, **edit}, f)
    with pytest.raises(ValueError, match=re.escape(says)):
        load_tokenizer(path)
