"""Twig checkpoints: MILVLG safetensors export/import and the orbax twig format."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from twig_jax.model.config import load_preset
from twig_jax.twig.module import Twig
from twig_jax.twig.config import TwigConfig
from twig_jax.twig.io import TwigFormatError, export_milvlg, import_milvlg, load_twig, save_twig, twig_to_milvlg

TWIG_CFG = TwigConfig(K=1, T=2, Kf=4, R=4)


@pytest.fixture(scope="module")
def twig():
    return Twig(load_preset("tiny").text, TWIG_CFG, rngs=nnx.Rngs(3))


def _params(t):
    return {"/".join(map(str, p)): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(t))[0]}


def _assert_same(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), k


def test_milvlg_keys_and_layout(twig):
    tc = twig.text_cfg
    sd = twig_to_milvlg(twig)
    want = {"model.norm.weight", "lm_head.weight"}
    for i in range(2):
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            want.add(f"model.layers.{i}.{n}.weight")
    assert set(sd) == want
    assert sd["lm_head.weight"].shape == (tc.vocab_size, tc.hidden_size)
    assert sd["model.layers.1.mlp.gate_proj.weight"].shape == (tc.intermediate_size, tc.hidden_size)
    np.testing.assert_array_equal(np.asarray(sd["model.layers.1.self_attn.o_proj.weight"]),
                                  np.asarray(twig.layers.wo[...][1]).T)


def test_milvlg_round_trip(twig, tmp_path):
    path = export_milvlg(twig, str(tmp_path / "twig.safetensors"))
    back = import_milvlg(path, twig.text_cfg, TWIG_CFG)
    _assert_same(twig, back)


def test_milvlg_missing_and_misshaped_keys(twig, tmp_path):
    from safetensors.flax import save_file

    sd = {k: jnp.asarray(v) for k, v in twig_to_milvlg(twig).items()}
    del sd["model.layers.1.mlp.up_proj.weight"]
    del sd["model.norm.weight"]
    sd["lm_head.weight"] = sd["lm_head.weight"].T  # [D, V]: our layout, not PyTorch's
    sd["model.layers.0.extra.weight"] = jnp.zeros((2,))
    path = str(tmp_path / "bad.safetensors")
    save_file(sd, path)
    with pytest.raises(TwigFormatError) as e:
        import_milvlg(path, twig.text_cfg, TWIG_CFG)
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "model.norm.weight" in msg
    assert "lm_head.weight: got (64, 256), expected (256, 64)" in msg
    assert "extra" not in msg  # unexpected keys only matter with strict=True
    # a checkpoint with fewer layers than asked for
    with pytest.raises(TwigFormatError, match="model.layers.2"):
        import_milvlg(export_milvlg(twig, str(tmp_path / "ok.safetensors")), twig.text_cfg,
                      TwigConfig(K=1, T=3, Kf=4, R=4))


def test_orbax_round_trip(twig, tmp_path):
    d = save_twig(twig, str(tmp_path / "twig"))
    back = load_twig(d, twig.text_cfg)
    assert back.twig_cfg == TWIG_CFG and back.text_cfg == twig.text_cfg
    _assert_same(twig, back)
    with pytest.raises(TwigFormatError, match="already holds"):
        save_twig(twig, d)
    import dataclasses

    with pytest.raises(TwigFormatError, match="different base"):
        load_twig(d, dataclasses.replace(twig.text_cfg, hidden_size=128))


def _files(path):
    import os

    out = {}
    for d, _, fs in os.walk(path):
        for f in fs:
            out[os.path.relpath(os.path.join(d, f), path)] = open(os.path.join(d, f), "rb").read()
    return out


def test_save_twig_never_replaces_what_is_not_a_twig_of_ours(twig, tmp_path):
    """A converted model (params/, config.json, marker) keeps every byte under overwrite=True;
    force=True replaces it with the twig."""
    model = tmp_path / "model"
    (model / "params").mkdir(parents=True)
    (model / "params" / "weights").write_bytes(b"base weights")
    (model / "config.json").write_text("{}")
    (model / "twig_jax.json").write_text("{}")
    before = _files(model)
    with pytest.raises(TwigFormatError, match="not a twig of ours"):
        save_twig(twig, str(model), overwrite=True)
    assert _files(model) == before
    save_twig(twig, str(model), force=True)
    _assert_same(twig, load_twig(str(model)))
    assert not (model / "config.json").exists()


def test_save_twig_is_atomic(twig, tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous twig as it was and no stray directories."""
    from twig_jax.twig import io as twig_io

    d = tmp_path / "twig"
    save_twig(twig, str(d), milvlg=True, extra_files={"training.json": "{}"})
    assert sorted(p.name for p in d.iterdir()) == ["model.safetensors", "params", "training.json", "twig_config.json"]
    before = _files(d)
    other = Twig(twig.text_cfg, TWIG_CFG, rngs=nnx.Rngs(4))

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(twig_io, "export_milvlg", fail)
    with pytest.raises(OSError, match="disk full"):
        save_twig(other, str(d), overwrite=True, milvlg=True)
    assert _files(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twig"]
    monkeypatch.undo()
    save_twig(other, str(d), overwrite=True)
    _assert_same(other, load_twig(str(d)))


def test_export_milvlg_never_writes_over_model_weights(twig, tmp_path):
    """A Hugging Face model dir keeps its model.safetensors; an existing twig export needs
    overwrite; force writes anyway."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"HF weights")
    with pytest.raises(TwigFormatError, match="not a twig export"):
        export_milvlg(twig, str(hf))
    (hf / "model.safetensors").unlink()
    with pytest.raises(TwigFormatError, match="holds a model"):
        export_milvlg(twig, str(hf))  # a new file in a model's folder would join its weights
    assert sorted(p.name for p in hf.iterdir()) == ["config.json"]
    path = export_milvlg(twig, str(tmp_path / "t.safetensors"))
    with pytest.raises(TwigFormatError, match="already holds a twig export"):
        export_milvlg(twig, path)
    export_milvlg(twig, path, overwrite=True)
    _assert_same(twig, import_milvlg(path, twig.text_cfg, TWIG_CFG))
    export_milvlg(twig, str(hf), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "t.safetensors"]
