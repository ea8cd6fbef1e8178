"""
decoding.py: how the benchmarks decode an answer: LLaDA's sampler (diffusion.generate,
docs/paper.md section 4.3) at temperature 0 on one prompt, and its flags with each task's
defaults (docs/paper.md section 5: NIAH 32 tokens in one block of 32 with 16 steps, RULER
64 / 64 / 64, LongBench blocks of 64 with a step per answer token), and what a task that decodes
an answer after a prompt of the cell's length costs (NIAH's, RULER's).
"""
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from diffusion import generate
from harness.flags import count, flag
from harness.results import generation_flops


@dataclass
class PromptCache:
    prompt_cache: bool = flag(False, "reuse the prompt's keys and values while the answer is "
                              "decoded (diffusion.py's approximate prefix cache): approaching "
                              "--steps times faster as the context grows; exact decoding is "
                              "the paper's protocol")


def decoding_flags(gen: int, block: int, n_steps: int, source: str) -> type:
    """--gen-length, --block-length, --steps (and --prompt-cache) with a task's defaults."""
    @dataclass
    class Decoding(PromptCache):
        gen_length: int = flag(gen, f"answer tokens ({source})", type=count)
        block_length: int = flag(block, f"tokens per decoding block ({source})", type=count)
        steps: int = flag(n_steps, f"decoding steps ({source})", type=count)
    return Decoding


def forward_tokens(cfg) -> int:
    """Tokens of the largest forward (the memory check): the longest prompt and its answer."""
    return max(cfg.len) + cfg.gen_length


def cell_flops(c, cfg, cell: dict) -> float:
    """What decoding costs: a prompt of the cell's length, steps as decode_answer takes."""
    return generation_flops(c, cell["length"], cfg.gen_length, cfg.block_length,
                            min(cfg.steps, cfg.gen_length), cfg.prompt_cache)


def decode_answer(model, tokenizer, prompt_ids: list[int], gen_length: int, block_length: int,
                  steps: int, prompt_cache: bool, device, cut_at_eos: bool = False) -> dict:
    """LLaDA's sampler at temperature 0 on one prompt (model token ids, BOS included when the
    tokenizer has one): the answer's text, the steps taken and how long decoding took. Steps
    follow the authors' wrapper: no more than answer tokens (it also rounds the answer up to
    whole blocks, which diffusion.check_schedule asks of every run).

    cut_at_eos: False, for the paper's benchmarks, decodes all gen_length tokens with the special
    tokens dropped, as the authors' OpenCompass wrapper does (no stop words); True keeps the text
    before the first EOS (what follows is padding to a diffusion model), for our tiny models."""
    prompt = torch.tensor([prompt_ids], device=device)  # (1, Lp)
    steps = min(steps, gen_length)
    t = time.perf_counter()
    # Inner bar only on a terminal (disable=None): in a log file the cell bar says enough.
    with tqdm(total=steps, desc="  decoding", unit="step", leave=False, dynamic_ncols=True,
              disable=None) as bar:
        out = generate(model, prompt, steps=steps, gen_length=gen_length,
                       block_length=block_length, temperature=0.0,
                       cache="prefix" if prompt_cache else None,
                       on_step=lambda: bar.update(1))  # (1, Lp + gen_length)
    answer = out[0, len(prompt_ids):].tolist()
    if cut_at_eos and tokenizer.eos_id in answer:  # after the first EOS comes padding
        answer = answer[:answer.index(tokenizer.eos_id)]
    return {"answer": tokenizer.decode(answer), "model_tokens": len(prompt_ids), "steps": steps,
            "seconds": round(time.perf_counter() - t, 3)}
