"""Tests for tokenizer.py: cl100k and its reserved ids, a checkpoint's tokenizer.json and ids, BOS
where a Hugging Face tokenizer puts it (never in corpus text), broken files in one line."""
import json
import os

import pytest
from tokenizers import Tokenizer as HF
from tokenizers import models, pre_tokenizers, processors

from harness.checkpoint import model_tokenizer
from harness.tokenizer import TIKTOKEN_VOCAB, load_tokenizer, tiktoken_tokenizer

WORDS = ["<|startoftext|>", "<|endoftext|>", "the", "needle", "is", "here"]


def make_tokenizer(path, post_processor=False, add_bos_token=None) -> str:
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
        (path / "tokenizer_config.json").write_text(json.dumps(
            {"add_bos_token": add_bos_token, "bos_token": {"content": "<|startoftext|>"}}))
    (path / "config.json").write_text('{"eos_token_id": 1, "mask_token_id": 5, "vocab_size": 6}')
    return str(path)


def test_tiktoken_round_trips_text_and_reserves_the_two_ids_after_cl100k():
    tok, text = tiktoken_tokenizer(), "Hello, wörld! 你好 <|endoftext|> and 12345\tand\nnewlines."
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < TIKTOKEN_VOCAB  # "<|endoftext|>" here is text
    assert (tok.eos_id, tok.mask_id, tok.vocab_size) == (100277, 100278, 100279)
    # EOS, [MASK] and cl100k's unused ids are skipped, not an error; prompts have no BOS
    assert tok.decode([tok.mask_id] + ids + [tok.eos_id, 100256, tok.mask_id]) == text
    assert tok.encode_prompt(text) == ids and tok.bos_id is None


def test_prompts_start_with_bos_exactly_when_the_tokenizer_asks_for_it(tmp_path):
    # The post-processor inserts BOS; tokenizer_config.json asks for it (Llama-style); both
    # (still one BOS); neither
    for i, (post_processor, add_bos_token, bos) in enumerate([
            (True, None, [0]), (False, True, [0]), (True, True, [0]), (False, False, []),
            (False, None, [])]):
        tok = load_tokenizer(make_tokenizer(tmp_path / str(i), post_processor, add_bos_token))
        assert tok.encode_prompt("the needle is here") == bos + [2, 3, 4, 5]
        assert tok.encode("the needle is here") == [2, 3, 4, 5]  # corpus text: never a BOS
        assert tok.bos_id == (bos or [None])[0]  # what perplexity puts before a document


def test_a_checkpoint_directory_names_its_tokenizer(tmp_path):
    t = load_tokenizer(make_tokenizer(tmp_path / "llada"))  # with the ids of its config.json
    assert (t.eos_id, t.mask_id, t.vocab_size) == (1, 5, 6) and t.fingerprint.startswith("json-")
    assert t.decode(t.encode("the needle is here") + [126336]) == "the needle is here"
    os.remove(tmp_path / "llada" / "config.json")  # LLaDA's ids without one
    t = load_tokenizer(str(tmp_path / "llada"))
    assert (t.eos_id, t.mask_id, t.vocab_size) == (126081, 126336, 126337)
    # Our tiny checkpoints name cl100k in config.json (the marker wins over a tokenizer.json)
    (tmp_path / "llada" / "config.json").write_text('{"tokenizer": "cl100k_base"}')
    assert load_tokenizer(str(tmp_path / "llada")).source == "cl100k_base"
    os.makedirs(tmp_path / "tiny")
    (tmp_path / "tiny" / "config.json").write_text('{"eos_token_id": 100277, "mask_token_id": 100278}')
    with pytest.raises(ValueError, match='tiny has no tokenizer.json; .* "tokenizer": "cl100k_base"'):
        load_tokenizer(str(tmp_path / "tiny"))
    assert model_tokenizer("tiny").fingerprint == "tiktoken-cl100k_base"
    with pytest.raises(ValueError, match="preset llada-8b uses LLaDA's tokenizer.json"):
        model_tokenizer("llada-8b")


def test_broken_files_beside_the_tokenizer_are_one_line_errors_naming_them(tmp_path):
    # A named pipe would block the read forever; a [MASK] id given as a string would compare
    # unequal to the model's int and be reported as a mismatch of two equal-looking numbers.
    for i, (name, content, says) in enumerate([
            ("tokenizer_config.json", "{not json", "tokenizer_config.json is not valid JSON"),
            ("config.json", None, "config.json is a named pipe, not a regular file"),
            ("tokenizer.json", None, "tokenizer.json is a named pipe, not a regular file"),
            ("config.json", '{"mask_token_id": "5"}', "mask_token_id is '5', not a whole number"),
            ("config.json", '{"vocab_size": true}', "vocab_size is True, not a whole number"),
            ("config.json", "[1, 2]", "config.json is not a JSON object")]):
        make_tokenizer(tmp_path / str(i), add_bos_token=True)
        if content is None:
            os.remove(tmp_path / str(i) / name)
            os.mkfifo(tmp_path / str(i) / name)
        else:
            (tmp_path / str(i) / name).write_text(content)
        with pytest.raises(ValueError) as e:
            load_tokenizer(str(tmp_path / str(i)))
        assert says in str(e.value) and "\n" not in str(e.value), e.value
