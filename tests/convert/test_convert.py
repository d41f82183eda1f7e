"""HF checkpoint loading (all layouts / file formats), convert + load_model round trip, errors."""

from __future__ import annotations

import glob
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import hf_logits, jax_logits, make_llava_inputs, rel_err
from twig_jax.convert.llava import ConversionError, convert, convert_main, is_converted, load_hf_llava, load_model

# ----------------------------------------------------------------------------------------------
# Helpers


def flat_params(model) -> dict[tuple, np.ndarray]:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    pa, pb = flat_params(a), flat_params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))


def read_tensors(d: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(os.path.join(d, "model.safetensors"))


def write_ckpt(d, tensors: dict[str, np.ndarray], config: dict | None, *, fmt="safetensors", shards=1,
               bf16=False) -> str:
    """Write `tensors` as a HF checkpoint: one file or `shards` files plus an index json."""
    import torch

    d = str(d)
    os.makedirs(d, exist_ok=True)
    if config is not None:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f)
    tt = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in tensors.items()}
    if bf16:
        tt = {k: v.to(torch.bfloat16) for k, v in tt.items()}
    keys = sorted(tt)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    groups = [keys[i::shards] for i in range(shards)]
    names = [f"{stem}.{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    for name, group in zip(names, groups):
        part = {k: tt[k] for k in group}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, os.path.join(d, name), metadata={"format": "pt"})
        else:
            torch.save(part, os.path.join(d, name))
    if shards > 1:
        index = {"metadata": {}, "weight_map": {k: n for n, g in zip(names, groups) for k in g}}
        with open(os.path.join(d, f"{stem}.{ext}.index.json"), "w") as f:
            json.dump(index, f)
    return d


def hf_config(d: str) -> dict:
    with open(os.path.join(d, "config.json")) as f:
        return json.load(f)


def rename(tensors, rules):
    """Rename keys by the first matching (old_prefix, new_prefix) rule."""
    out = {}
    for k, v in tensors.items():
        for old, new in rules:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


# transformers 5 writes: vision_tower.*, multi_modal_projector.*, language_model.model.*,
# language_model.lm_head.weight (the "old" style without the CLIP `vision_model.` level).
STYLES = {
    "old": [("vision_tower.", "vision_tower.vision_model.")],
    "new": [("vision_tower.", "model.vision_tower.vision_model."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head.")],
}


@pytest.fixture(scope="module")
def ref_mha(hf_llava_mha):
    return load_hf_llava(hf_llava_mha.dir)


@pytest.fixture(scope="module")
def ref_gqa(hf_llava_gqa):
    return load_hf_llava(hf_llava_gqa.dir)


# ----------------------------------------------------------------------------------------------
# llava-hf layout


def test_weights_land_where_expected(hf_llava_gqa, ref_gqa):
    sd = {k: v.numpy() for k, v in hf_llava_gqa.model.state_dict().items()}
    m = ref_gqa
    np.testing.assert_array_equal(m.text.layers.wk[...][1], sd["model.language_model.layers.1.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(m.text.layers.w_down[...][0], sd["model.language_model.layers.0.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(m.text.lm_head[...], sd["lm_head.weight"].T)
    np.testing.assert_array_equal(m.projector.w1[...], sd["model.multi_modal_projector.linear_1.weight"].T)
    np.testing.assert_array_equal(m.vision.blocks.w_fc2[...][1], sd["model.vision_tower.encoder.layers.1.mlp.fc2.weight"].T)
    conv = sd["model.vision_tower.embeddings.patch_embedding.weight"]
    np.testing.assert_array_equal(m.vision.patch_embed[...], conv.reshape(conv.shape[0], -1).T)
    assert m.vision.blocks.wq[...].shape[0] == 2  # vision_feature_layer -2 of 3: deepest block unused


@pytest.mark.parametrize("style", ["old", "new"])
def test_key_prefix_styles(tmp_path, hf_llava_mha, ref_mha, style):
    tensors = rename(read_tensors(hf_llava_mha.dir), STYLES[style])
    # Buffers older checkpoints carry, which the model does not use.
    vision = "vision_tower.vision_model." if style == "old" else "model.vision_tower.vision_model."
    text = "language_model.model." if style == "old" else "model.language_model."
    tensors[vision + "embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
    tensors[text + "layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    d = write_ckpt(tmp_path, tensors, hf_config(hf_llava_mha.dir))
    assert_same_params(load_hf_llava(d), ref_mha)


def test_new_style_without_vision_model_level(tmp_path, hf_llava_gqa, ref_gqa):
    hf_llava_gqa.model.save_pretrained(tmp_path, save_original_format=False)  # in-memory key names
    assert any(k.startswith("model.vision_tower.embeddings.") for k in read_tensors(str(tmp_path)))
    assert_same_params(load_hf_llava(str(tmp_path)), ref_gqa)


def test_mixed_styles_are_reported(tmp_path, hf_llava_mha):
    tensors = read_tensors(hf_llava_mha.dir)
    tensors["model.language_model.norm.weight"] = tensors["language_model.model.norm.weight"]
    d = write_ckpt(tmp_path, tensors, hf_config(hf_llava_mha.dir))
    with pytest.raises(ConversionError, match=r"model\.language_model\.norm\.weight"):
        load_hf_llava(d)


def test_sharded_safetensors(tmp_path, hf_llava_gqa, ref_gqa):
    hf_llava_gqa.model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(glob.glob(str(tmp_path / "model-*.safetensors"))) > 2
    assert_same_params(load_hf_llava(str(tmp_path)), ref_gqa)


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin(tmp_path, hf_llava_mha, ref_mha, shards):
    d = write_ckpt(tmp_path, read_tensors(hf_llava_mha.dir), hf_config(hf_llava_mha.dir), fmt="bin", shards=shards)
    assert os.path.exists(os.path.join(d, "pytorch_model.bin.index.json")) == (shards > 1)
    assert_same_params(load_hf_llava(d), ref_mha)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_bf16_source(tmp_path, hf_llava_mha, ref_mha, fmt):
    d = write_ckpt(tmp_path, read_tensors(hf_llava_mha.dir), hf_config(hf_llava_mha.dir), fmt=fmt, shards=2,
                   bf16=True)
    ref = flat_params(ref_mha)
    as_f32 = flat_params(load_hf_llava(d, dtype=jnp.float32))
    as_bf16 = flat_params(load_hf_llava(d, dtype=jnp.bfloat16))
    for k, v in ref.items():
        want = v.astype(jnp.bfloat16)
        assert as_bf16[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(as_bf16[k], want, err_msg=str(k))
        np.testing.assert_array_equal(as_f32[k], want.astype(np.float32), err_msg=str(k))


# ----------------------------------------------------------------------------------------------
# liuhaotian layout


def _liuhaotian(tmp_path, tl, vision: str):
    """Write tl's weights in the liuhaotian layout; returns (model_dir, vision_dir or None)."""
    from transformers import CLIPVisionModel

    tensors = read_tensors(tl.dir)
    vision_t = {k[len("vision_tower."):]: v for k, v in tensors.items() if k.startswith("vision_tower.")}
    main = rename({k: v for k, v in tensors.items() if not k.startswith("vision_tower.")}, [
        ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
        ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ])
    main["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    hf = hf_config(tl.dir)
    cfg = dict(hf["text_config"])
    cfg.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava", mm_vision_tower="tiny/clip-vit-test",
               mm_hidden_size=hf["vision_config"]["hidden_size"], mm_projector_type="mlp2x_gelu",
               mm_vision_select_layer=hf["vision_feature_layer"], mm_vision_select_feature="patch",
               mm_use_im_start_end=False, image_aspect_ratio="pad", image_token_index=hf["image_token_index"])
    vision_dir = str(tmp_path / "clip")
    if vision == "embedded_and_clip":  # a separate CLIP checkpoint wins over an embedded tower
        main.update({"model.vision_tower.vision_tower.vision_model." + k: np.zeros_like(v) for k, v in vision_t.items()})
    if vision in ("clip_vision_model", "embedded_and_clip"):  # what CLIPVisionModel.save_pretrained writes
        clip = CLIPVisionModel(tl.model.config.vision_config)
        clip.load_state_dict({k: v for k, v in tl.model.model.vision_tower.state_dict().items()})
        clip.save_pretrained(vision_dir)
    elif vision == "clip_full":  # a full CLIPModel: text tower & projections must be ignored
        full = {"vision_model." + k: v for k, v in vision_t.items()}
        full["vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
        full["text_model.embeddings.token_embedding.weight"] = np.zeros((10, 8), np.float32)
        full["text_model.final_layer_norm.weight"] = np.ones(8, np.float32)
        full["logit_scale"] = np.zeros((), np.float32)
        full["visual_projection.weight"] = np.zeros((16, 32), np.float32)
        full["text_projection.weight"] = np.zeros((16, 8), np.float32)
        write_ckpt(vision_dir, full, {"model_type": "clip", "vision_config": hf["vision_config"]}, fmt="bin")
    elif vision == "embedded":  # tower inside the main checkpoint; vision_dir has only the config
        main.update({"model.vision_tower.vision_tower.vision_model." + k: v for k, v in vision_t.items()})
        write_ckpt(vision_dir, {}, hf["vision_config"])
        os.remove(os.path.join(vision_dir, "model.safetensors"))
    model_dir = write_ckpt(tmp_path / "llava", main, cfg, fmt="bin", shards=2)
    return model_dir, vision_dir


@pytest.mark.parametrize("vision", ["clip_vision_model", "clip_full", "embedded", "embedded_and_clip"])
def test_liuhaotian_layout(tmp_path, hf_llava_mha, ref_mha, vision):
    model_dir, vision_dir = _liuhaotian(tmp_path, hf_llava_mha, vision)
    m = load_hf_llava(model_dir, vision_dir=vision_dir)
    assert m.cfg == ref_mha.cfg
    assert_same_params(m, ref_mha)
    ids, pix = make_llava_inputs(m.cfg)
    np.testing.assert_array_equal(jax_logits(m, ids, pix), jax_logits(ref_mha, ids, pix))


def test_liuhaotian_without_vision_fails_clearly(tmp_path, hf_llava_mha):
    model_dir, _ = _liuhaotian(tmp_path, hf_llava_mha, "clip_vision_model")
    with pytest.raises(ConversionError, match="vision"):
        load_hf_llava(model_dir)


# ----------------------------------------------------------------------------------------------
# convert / load_model

TOKENIZER_EXTRAS = {
    "tokenizer_config.json": "{}", "special_tokens_map.json": "{}", "tokenizer.json": "{}",
    "chat_template.jinja": "{{ messages }}", "preprocessor_config.json": "{}",
}


@pytest.fixture(scope="module")
def converted_mha(tmp_path_factory, hf_llava_mha):
    src = str(tmp_path_factory.mktemp("src_mha") / "hf")
    shutil.copytree(hf_llava_mha.dir, src)
    for name, text in TOKENIZER_EXTRAS.items():
        with open(os.path.join(src, name), "w") as f:
            f.write(text)
    dst = str(tmp_path_factory.mktemp("converted_mha"))
    convert(src, dst)
    return src, dst


def test_convert_round_trip(converted_mha, hf_llava_mha, ref_mha):
    src, dst = converted_mha
    assert is_converted(dst) and not is_converted(src)
    for name in [*TOKENIZER_EXTRAS, "config.json", "twig_jax.json", "generation_config.json"]:
        assert os.path.isfile(os.path.join(dst, name)), name
    assert os.path.isdir(os.path.join(dst, "params"))
    m = load_model(dst)
    assert m.cfg == ref_mha.cfg
    assert_same_params(m, ref_mha)
    ids, pix = make_llava_inputs(m.cfg)
    got = jax_logits(m, ids, pix)
    np.testing.assert_array_equal(got, jax_logits(ref_mha, ids, pix))
    assert rel_err(got, hf_logits(hf_llava_mha.model, ids, pix)) <= 1e-4
    # load_model also takes the HF dir itself.
    assert_same_params(load_model(src), ref_mha)


def test_convert_refuses_to_overwrite(converted_mha):
    src, dst = converted_mha
    with pytest.raises(ConversionError, match="already"):
        convert(src, dst)


def test_convert_bf16_and_cli(tmp_path, hf_llava_gqa, ref_gqa):
    dst = str(tmp_path / "bf16")
    assert convert_main([hf_llava_gqa.dir, dst, "--dtype", "bfloat16"]) == 0
    m = load_model(dst)
    assert all(v.dtype == jnp.bfloat16 for v in flat_params(m).values())
    ids, pix = make_llava_inputs(m.cfg)
    want = hf_logits(hf_llava_gqa.model, ids, pix)
    assert rel_err(jax_logits(m, ids, pix), want) <= 0.1
    # Upcast on load: the bf16-rounded weights, as float32.
    m32 = load_model(dst, dtype="float32")
    for k, v in flat_params(m32).items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, flat_params(ref_gqa)[k].astype(jnp.bfloat16).astype(np.float32))
    assert convert_main([hf_llava_gqa.dir, dst]) == 2  # exists, no --force
    assert convert_main([hf_llava_gqa.dir, dst, "--force"]) == 0
    assert all(v.dtype == np.float32 for v in flat_params(load_model(dst)).values())


# ----------------------------------------------------------------------------------------------
# Errors


def _broken(tmp_path, tl, *, drop=(), add=None, reshape=None) -> str:
    tensors = read_tensors(tl.dir)
    for k in drop:
        del tensors[k]
    tensors.update(add or {})
    for k, shape in (reshape or {}).items():
        tensors[k] = np.zeros(shape, np.float32)
    return write_ckpt(tmp_path, tensors, hf_config(tl.dir))


def test_missing_key(tmp_path, hf_llava_mha):
    d = _broken(tmp_path, hf_llava_mha, drop=["language_model.model.layers.1.mlp.up_proj.weight",
                                              "vision_tower.pre_layrnorm.bias"])
    with pytest.raises(ConversionError) as e:
        load_hf_llava(d)
    assert "language_model.model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert "vision_tower.pre_layrnorm.bias" in str(e.value)
    assert "missing" in str(e.value)


def test_unexpected_key(tmp_path, hf_llava_mha):
    d = _broken(tmp_path, hf_llava_mha, add={"language_model.model.layers.0.foo.weight": np.zeros(3, np.float32),
                                             "something_else": np.zeros(1, np.float32)})
    with pytest.raises(ConversionError) as e:
        load_hf_llava(d)
    assert "language_model.model.layers.0.foo.weight" in str(e.value)
    assert "something_else" in str(e.value)
    assert "unexpected" in str(e.value)


def test_wrong_shape(tmp_path, hf_llava_mha):
    d = _broken(tmp_path, hf_llava_mha, reshape={"multi_modal_projector.linear_2.bias": (63,)})
    with pytest.raises(ConversionError) as e:
        load_hf_llava(d)
    assert "multi_modal_projector.linear_2.bias: expected [64], found [63]" in str(e.value)


def test_all_problems_reported_at_once(tmp_path, hf_llava_gqa):
    d = _broken(tmp_path, hf_llava_gqa, drop=["language_model.model.norm.weight", "language_model.lm_head.weight"],
                add={"extra.key": np.zeros(2, np.float32)},
                reshape={"language_model.model.layers.0.self_attn.k_proj.weight": (64, 64)})
    with pytest.raises(ConversionError) as e:
        load_hf_llava(d)
    msg = str(e.value)
    for key in ["language_model.model.norm.weight", "language_model.lm_head.weight", "extra.key",
                "language_model.model.layers.0.self_attn.k_proj.weight: expected [32, 64], found [64, 64]"]:
        assert key in msg, key


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 2, 1))


DAMAGE = {
    "no_params": lambda d: shutil.rmtree(os.path.join(d, "params")),
    "no_metadata": lambda d: os.remove(os.path.join(d, "params", "_METADATA")),
    "truncated_metadata": lambda d: _truncate(os.path.join(d, "params", "_METADATA")),
    "truncated_data": lambda d: [_truncate(p) for p in glob.glob(os.path.join(d, "params", "**", "d", "*"),
                                                                 recursive=True)],
    "no_marker": lambda d: os.remove(os.path.join(d, "twig_jax.json")),
    "truncated_config": lambda d: _truncate(os.path.join(d, "config.json")),
}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax background noise
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_corrupt_converted_checkpoint(tmp_path, converted_mha, damage):
    d = str(tmp_path / "ckpt")
    shutil.copytree(converted_mha[1], d)
    DAMAGE[damage](d)
    with pytest.raises(ConversionError, match=str(tmp_path)):
        load_model(d)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ConversionError, match="no such"):
        load_model(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------------------------
# The liuhaotian layout as published: no image_token_index, no <image> in the tokenizer


def _hf_ids(prompt, placeholder: int, hf_image_id: int) -> np.ndarray:
    """A prompt of ours as the llava-hf oracle's input ids: its <image> row stands for our placeholder."""
    return np.array([[hf_image_id if t == placeholder else t for t in prompt]], np.int64)


def _hf_greedy(model, ids: np.ndarray, pixel_values, vocab: int, steps: int, eos: int) -> list[int]:
    """Greedy tokens of the HF oracle over the first `vocab` logits (the liuhaotian vocabulary)."""
    out = []
    for _ in range(steps):
        tok = int(np.argmax(hf_logits(model, ids, pixel_values)[0, -1, :vocab]))
        out.append(tok)
        if tok == eos:
            break
        ids = np.concatenate([ids, [[tok]]], axis=1)
    return out


def test_liuhaotian_as_published_converts_and_matches_hf(tmp_path, tiny_liuhaotian):
    from twig_jax.pipeline import Pipeline, load_bundle

    lh = tiny_liuhaotian
    dst = str(tmp_path / "converted")
    assert convert_main([lh.dir, dst, "--vision-dir", lh.vision_dir]) == 0
    bundle = load_bundle(dst, dtype="float32")
    cfg = bundle.model.cfg
    vocab = cfg.text.vocab_size
    assert vocab == len(bundle.tokenizer) == lh.hf.cfg.text.vocab_size - 1
    placeholder = cfg.image_token_index
    assert not 0 <= placeholder < vocab  # never embedded, so it takes no row of the vocabulary

    pipe = Pipeline(bundle.model, bundle.tokenizer, bundle.image_processor)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 36, 3), dtype=np.uint8), rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)]
    questions = ["what is in the image?", "what color is this shape?"]
    prompts = pipe.encode(questions)
    pixels = pipe.image_processor(images)
    hf_image_id = lh.hf.cfg.image_token_index
    for prompt, pix in zip(prompts, pixels):
        assert prompt.count(placeholder) == cfg.num_image_tokens
        assert all(0 <= t < vocab for t in prompt if t != placeholder)
        want = hf_logits(lh.hf.model, _hf_ids(prompt, placeholder, hf_image_id), pix[None])[..., :vocab]
        got = jax_logits(bundle.model, np.array([prompt]), pix[None])
        assert np.abs(want).max() > 1.0
        assert rel_err(got, want) <= 1e-4

    answers, _ = pipe.answer(images, questions, max_new_tokens=8)
    eos = bundle.tokenizer.eos_token_id
    for answer, prompt, pix in zip(answers, prompts, pixels):
        want = _hf_greedy(lh.hf.model, _hf_ids(prompt, placeholder, hf_image_id), pix[None], vocab, 8, eos)
        assert answer.tokens == want


def test_placeholder_outside_vocabulary_passes_input_checks(tiny_liuhaotian):
    from twig_jax.decode.buckets import Batcher, InputError

    cfg = load_hf_llava(tiny_liuhaotian.dir, vision_dir=tiny_liuhaotian.vision_dir).cfg
    n, v = cfg.num_image_tokens, cfg.vision
    pix = np.zeros((1, v.num_channels, v.image_size, v.image_size), np.float32)
    batcher = Batcher(cfg)
    batcher.check_inputs([[1, 5] + [cfg.image_token_index] * n + [7]], pix, 4)
    with pytest.raises(InputError, match="outside the vocabulary"):
        batcher.check_inputs([[1, cfg.text.vocab_size] + [cfg.image_token_index] * n], pix, 4)
    with pytest.raises(InputError, match="outside the vocabulary"):
        batcher.check_inputs([[1, -1] + [cfg.image_token_index] * n], pix, 4)
    with pytest.raises(InputError, match="image placeholder"):  # a placeholder without an image
        batcher.check_inputs([[1, 5, cfg.image_token_index]], None, 4)


def test_embed_never_looks_up_the_placeholder(monkeypatch, tiny_liuhaotian, hf_llava_mha):
    from twig_jax.model.llama import LlamaModel

    looked_up = []
    original = LlamaModel.embed_tokens

    def recording(self, tokens):
        looked_up.append(np.asarray(tokens))
        return original(self, tokens)

    monkeypatch.setattr(LlamaModel, "embed_tokens", recording)
    for m in (load_hf_llava(tiny_liuhaotian.dir, vision_dir=tiny_liuhaotian.vision_dir), load_hf_llava(hf_llava_mha.dir)):
        ids, pix = make_llava_inputs(m.cfg)
        looked_up.clear()
        x = m.embed(jnp.asarray(ids, jnp.int32), m.image_features(jnp.asarray(pix)))
        assert np.isfinite(np.asarray(x)).all()
        assert looked_up and not any((t == m.cfg.image_token_index).any() for t in looked_up)
        assert all(((t >= 0) & (t < m.cfg.text.vocab_size)).all() for t in looked_up)


# ----------------------------------------------------------------------------------------------
# Architectures other than LLaVA-1.5 are named and refused


def _with_config(tmp_path, tl, edit) -> str:
    """A copy of tl's checkpoint whose config.json is edit(config)."""
    d = str(tmp_path / "model")
    shutil.copytree(tl.dir, d)
    cfg = edit(hf_config(tl.dir))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return d


def _qwen2_vl(c):
    c = dict(c, architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl", image_token_id=151655)
    c["text_config"] = dict(c["text_config"], model_type="qwen2_vl_text")
    return c


def _qwen2_vl_flat(c):  # the older Qwen2-VL config.json: text keys at the top level
    return dict(c["text_config"], architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl",
                vision_config=c["vision_config"], image_token_id=151655)


def _llava_next(c):
    return dict(c, architectures=["LlavaNextForConditionalGeneration"], model_type="llava_next",
                image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])


def _pinpoints_only(c):
    return dict(c, image_grid_pinpoints=[[28, 56], [56, 28]])


def _siglip_tower(c):
    return dict(c, vision_config=dict(c["vision_config"], model_type="siglip_vision_model"))


def _mistral_text(c):
    return dict(c, text_config=dict(c["text_config"], model_type="mistral", sliding_window=4096))


UNSUPPORTED = {
    "qwen2_vl": (_qwen2_vl, "Qwen2VLForConditionalGeneration"),
    "qwen2_vl_flat": (_qwen2_vl_flat, "Qwen2VLForConditionalGeneration"),
    "llava_next": (_llava_next, "LlavaNextForConditionalGeneration"),
    "image_grid_pinpoints": (_pinpoints_only, "image_grid_pinpoints"),
    "siglip_tower": (_siglip_tower, "siglip_vision_model"),
    "mistral_text": (_mistral_text, "mistral"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_other_architectures_are_refused(tmp_path, capsys, hf_llava_mha, case):
    edit, name = UNSUPPORTED[case]
    d = _with_config(tmp_path, hf_llava_mha, edit)
    with pytest.raises(ConversionError, match=name):
        load_hf_llava(d)
    capsys.readouterr()
    dst = str(tmp_path / "out")
    assert convert_main([d, dst]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and name in err and "config.json" in err
    assert not os.path.exists(dst)


LIUHAOTIAN_UNSUPPORTED = {
    "llava_v1.6_anyres": ({"image_aspect_ratio": "anyres", "image_grid_pinpoints": [[28, 56], [56, 28]],
                           "mm_patch_merge_type": "spatial_unpad"}, "anyres"),
    "llava_mistral": ({"architectures": ["LlavaMistralForCausalLM"]}, "LlavaMistralForCausalLM"),
    "im_start_end": ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
    "select_feature": ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature"),
}


@pytest.mark.parametrize("case", list(LIUHAOTIAN_UNSUPPORTED))
def test_other_liuhaotian_variants_are_refused(tmp_path, capsys, tiny_liuhaotian, case):
    edit, name = LIUHAOTIAN_UNSUPPORTED[case]
    d = str(tmp_path / "model")
    shutil.copytree(tiny_liuhaotian.dir, d)
    cfg = dict(hf_config(d), **edit)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    assert convert_main([d, str(tmp_path / "out"), "--vision-dir", tiny_liuhaotian.vision_dir]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and name in err


# ----------------------------------------------------------------------------------------------
# The destination: refused when it holds anything, replaced whole with --force, never the source


def _other_model_dir(d) -> dict[str, bytes]:
    """A directory holding another model's files; returns them by name."""
    os.makedirs(d, exist_ok=True)
    files = {"config.json": b'{"model_type": "other"}', "tokenizer.json": b'{"other": 1}',
             "generation_config.json": b'{"other": 2}', "model.safetensors": b"other weights"}
    for name, data in files.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    return files


def _contents(d) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(d):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, d)] = f.read()
    return out


def test_convert_refuses_a_non_empty_destination(tmp_path, capsys, hf_llava_mha):
    dst = str(tmp_path / "other")
    files = _other_model_dir(dst)
    with pytest.raises(ConversionError, match=r"not empty.*--force"):
        convert(hf_llava_mha.dir, dst)
    assert convert_main([hf_llava_mha.dir, dst]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and dst in err
    assert _contents(dst) == files
    assert sorted(os.listdir(tmp_path)) == ["other"]


def test_convert_force_replaces_the_destination_whole(tmp_path, hf_llava_mha, ref_mha):
    dst = str(tmp_path / "other")
    _other_model_dir(dst)
    os.makedirs(os.path.join(dst, "params", "stale"))
    assert convert_main([hf_llava_mha.dir, dst, "--force"]) == 0
    fresh = str(tmp_path / "fresh")
    convert(hf_llava_mha.dir, fresh)
    assert sorted(os.listdir(dst)) == sorted(os.listdir(fresh))  # nothing of the other model is left
    assert not os.path.exists(os.path.join(dst, "params", "stale"))
    assert hf_config(dst) == hf_config(fresh)
    assert_same_params(load_model(dst), ref_mha)
    assert sorted(os.listdir(tmp_path)) == ["fresh", "other"]  # no temporary sibling left behind


def test_convert_into_an_empty_directory(tmp_path, hf_llava_mha):
    dst = tmp_path / "empty"
    dst.mkdir()
    convert(hf_llava_mha.dir, str(dst))
    assert is_converted(str(dst))


def test_failed_forced_convert_leaves_the_destination_as_it_was(tmp_path, monkeypatch, hf_llava_mha):
    import twig_jax.convert.llava as conv

    dst = str(tmp_path / "other")
    files = _other_model_dir(dst)
    broken = _with_config(tmp_path, hf_llava_mha, lambda c: dict(c, vision_feature_layer="last"))
    with pytest.raises(ConversionError, match="vision_feature_layer"):
        convert(broken, dst, overwrite=True)
    assert _contents(dst) == files

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(conv, "save_config", fail)  # the write fails half way
    with pytest.raises(ConversionError, match="No space left"):
        convert(hf_llava_mha.dir, dst, overwrite=True)
    assert _contents(dst) == files
    assert sorted(os.listdir(tmp_path)) == ["model", "other"]


def test_convert_never_writes_into_the_source(tmp_path, hf_llava_mha):
    src = str(tmp_path / "parent" / "hf")
    shutil.copytree(hf_llava_mha.dir, src)
    before = _contents(src)
    link = str(tmp_path / "link")
    os.symlink(src, link)
    for dst in (src, link, str(tmp_path / "parent"), os.path.join(src, "converted")):
        with pytest.raises(ConversionError, match="source"):
            convert(src, dst, overwrite=True)
        assert convert_main([src, dst, "--force"]) == 2
    assert _contents(src) == before
    with pytest.raises(ConversionError, match="source"):  # the CLIP checkpoint is a source too
        convert(src, str(tmp_path / "out"), vision_dir=str(tmp_path / "out" / "clip"), overwrite=True)


# ----------------------------------------------------------------------------------------------
# Progress and one-line errors


def test_convert_shows_progress(tmp_path, capsys, hf_llava_gqa):
    assert convert_main([hf_llava_gqa.dir, str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    # Every tensor but the deepest vision block's and the post-LayerNorm's (vision_feature_layer -2 of 3).
    n = sum(1 for k in read_tensors(hf_llava_gqa.dir) if "encoder.layers.2." not in k and "post_layernorm" not in k)
    assert f"{n}/{n} tensors (100%)" in err
    assert "tensors/s" in err and "left" in err


def _bad_json(d):
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{not json")


def _no_hidden_size(d):
    cfg = hf_config(d)
    del cfg["text_config"]["hidden_size"]
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)


def _zero_heads(d):
    cfg = hf_config(d)
    cfg["text_config"]["num_attention_heads"] = 0
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)


def _string_size(d):
    cfg = hf_config(d)
    cfg["vision_config"]["image_size"] = "28"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)


def _replace_tensors(d, edit):
    tensors = read_tensors(d)
    edit(tensors)
    os.remove(os.path.join(d, "model.safetensors"))
    write_ckpt(d, tensors, None)


def _many_missing(d):
    _replace_tensors(d, lambda t: [t.pop(k) for k in list(t) if k.startswith("language_model.")])


def _wrong_shape(d):
    _replace_tensors(d, lambda t: t.update({"multi_modal_projector.linear_2.bias": np.zeros(63, np.float32)}))


def _truncated_weights(d):
    _truncate(os.path.join(d, "model.safetensors"))


def _garbage_bin(d):
    os.remove(os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x02not a pickle\nat all\n")


def _no_weights(d):
    os.remove(os.path.join(d, "model.safetensors"))


def _converted_already(d):
    convert(d, d + "-converted")
    shutil.rmtree(d)
    os.rename(d + "-converted", d)


def _missing_shard(d):
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors"}}, f)


BAD_SOURCES = {  # damage -> what the one line must name
    "no_config": (lambda d: os.remove(os.path.join(d, "config.json")), "config.json"),
    "bad_json": (_bad_json, "config.json: not valid JSON"),
    "no_hidden_size": (_no_hidden_size, "hidden_size"),
    "zero_heads": (_zero_heads, "num_attention_heads is 0"),
    "string_size": (_string_size, "image_size is '28'"),
    "many_missing": (_many_missing, "language_model.model.layers.0."),
    "wrong_shape": (_wrong_shape, "multi_modal_projector.linear_2.bias: expected [64], found [63]"),
    "truncated_weights": (_truncated_weights, "model.safetensors"),
    "garbage_bin": (_garbage_bin, "pytorch_model.bin"),
    "no_weights": (_no_weights, "no weight files"),
    "missing_shard": (_missing_shard, "model-00001-of-00002.safetensors"),
    "already_converted": (_converted_already, "already a converted twig_jax checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_convert_errors_are_one_line(tmp_path, capsys, hf_llava_mha, case):
    damage, named = BAD_SOURCES[case]
    src = str(tmp_path / "src")
    shutil.copytree(hf_llava_mha.dir, src)
    damage(src)
    capsys.readouterr()
    assert convert_main([src, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("twig-jax convert: error: ") and named in lines[0], lines[0]
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")


def test_convert_error_for_an_unwritable_destination(tmp_path, capsys, hf_llava_mha):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert convert_main([hf_llava_mha.dir, str(blocker / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(blocker) in lines[0]
    assert convert_main([hf_llava_mha.dir, str(blocker), "--force"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not a directory" in lines[0]
