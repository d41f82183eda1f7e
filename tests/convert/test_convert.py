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
