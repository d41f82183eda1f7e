"""Greedy generation is token-identical to Hugging Face `generate` on the same tiny checkpoint."""

import numpy as np
import pytest
import torch

from twig_jax.convert.llava import load_model
from twig_jax.decode.generator import Generator


def _prompts(cfg, seed):
    """3 prompts of different lengths, each with one expanded image."""
    rng = np.random.default_rng(seed)
    n, img, vocab = cfg.num_image_tokens, cfg.image_token_index, cfg.text.vocab_size
    prompts = []
    for before, after in ((1, 4), (6, 2), (3, 11)):
        text = lambda k: [int(t) for t in rng.integers(3, vocab, size=k) if t != img] or [5]
        prompts.append([1] + text(before) + [img] * n + text(after))
    v = cfg.vision
    pixels = rng.standard_normal((3, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    return prompts, pixels


def _hf_greedy(model, prompts, pixels, new_tokens, eos):
    s = max(map(len, prompts))
    ids = torch.zeros((len(prompts), s), dtype=torch.long)
    mask = torch.zeros((len(prompts), s), dtype=torch.long)
    for i, p in enumerate(prompts):  # HF batches decoder-only models left-padded
        ids[i, s - len(p):] = torch.tensor(p)
        mask[i, s - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.from_numpy(pixels),
                             max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    rows = []
    for r in out[:, s:].tolist():
        if eos is not None and eos in r:
            r = r[:r.index(eos) + 1]
        rows.append(r)
    return rows


@pytest.mark.parametrize("fixture", ["hf_llava_mha", "hf_llava_gqa"])
def test_greedy_32_tokens_match_hf_generate(request, fixture):
    d, torch_model, cfg = request.getfixturevalue(fixture)
    prompts, pixels = _prompts(cfg, seed=0)
    ours = Generator(load_model(d)).generate(prompts, pixels, max_new_tokens=32, eos_ids=())
    theirs = _hf_greedy(torch_model, prompts, pixels, 32, eos=None)
    assert [len(t) for t in ours.tokens] == [32, 32, 32]
    assert ours.tokens == theirs


def test_greedy_with_eos_matches_hf_generate(hf_llava_gqa):
    d, torch_model, cfg = hf_llava_gqa
    prompts, pixels = _prompts(cfg, seed=1)
    gen = Generator(load_model(d))
    free = gen.generate(prompts, pixels, max_new_tokens=32, eos_ids=())
    eos = free.tokens[1][5]  # a token that does occur, so at least one row stops early
    ours = gen.generate(prompts, pixels, max_new_tokens=32, eos_ids=(eos,))
    theirs = _hf_greedy(torch_model, prompts, pixels, 32, eos=eos)
    assert min(len(t) for t in ours.tokens) < 32
    assert ours.tokens == theirs


def test_min_new_tokens_matches_hf_generate(hf_llava_gqa):
    d, torch_model, cfg = hf_llava_gqa
    prompts, pixels = _prompts(cfg, seed=1)
    gen = Generator(load_model(d))
    free = gen.generate(prompts, pixels, max_new_tokens=16, eos_ids=())
    eos = free.tokens[1][1]  # row 1 would stop after 2 tokens
    ours = gen.generate(prompts, pixels, max_new_tokens=16, eos_ids=(eos,), min_new_tokens=6)
    s = max(map(len, prompts))
    ids = torch.zeros((len(prompts), s), dtype=torch.long)
    mask = torch.zeros((len(prompts), s), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, s - len(p):] = torch.tensor(p)
        mask[i, s - len(p):] = 1
    with torch.no_grad():
        out = torch_model.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.from_numpy(pixels),
                                   max_new_tokens=16, min_new_tokens=6, do_sample=False, eos_token_id=eos,
                                   pad_token_id=0)
    theirs = [r[:r.index(eos) + 1] if eos in r else r for r in out[:, s:].tolist()]
    assert ours.tokens == theirs
    assert all(len(t) >= 6 for t in ours.tokens)
    with pytest.raises(Exception, match="min_new_tokens"):
        gen.generate(prompts, pixels, max_new_tokens=4, min_new_tokens=5)
