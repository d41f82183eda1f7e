"""CLI errors are one line naming the problem and its file (exit status 2 for bad input, 1 for
anything else), never a traceback; `twig-jax --debug COMMAND` shows the trace. And an official
MILVLG twig (bare model.safetensors, no config of ours) loads from the command line with --K and
--R, answering exactly as the same twig saved with its config."""

from __future__ import annotations

import json
import os

import pytest

from cli_fixtures import MAX_NEW, QUESTIONS, error_lines, reference, run_cli, saved  # noqa: F401  (fixtures)


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    (line,) = error_lines(err)
    return line


def test_missing_model_dir_is_one_line(saved, tmp_path, capsys):
    code, err = run_cli(["generate", "--model", str(tmp_path / "nope"), "--image", saved["images"][0],
                         "--prompt", "hi"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith("twig-jax generate: error:") and "nope" in line


def test_debug_shows_the_trace(saved, tmp_path):
    from twig_jax.cli.main import main
    from twig_jax.convert.llava import ConversionError

    with pytest.raises(ConversionError):
        main(["--debug", "generate", "--model", str(tmp_path / "nope"), "--image", saved["images"][0],
              "--prompt", "hi"])


def test_missing_twig_is_one_line(saved, tmp_path, capsys):
    code, err = run_cli(["generate", "--model", saved["model_dir"], "--twig", str(tmp_path / "no-twig"),
                         "--image", saved["images"][0], "--prompt", "hi"], capsys)
    assert code == 2
    assert "no-twig" in _one_error_line(err)


def test_unexpected_errors_are_one_line_with_status_1(monkeypatch, capsys):
    from twig_jax.cli import main as cli

    def broken(argv):
        raise RuntimeError("something broke\nover two lines")

    monkeypatch.setitem(cli.COMMANDS, "data", cli.Command(broken, "test"))
    code, err = run_cli(["data", "shapes"], capsys)
    assert code == 1
    line = _one_error_line(err)
    assert "RuntimeError: something broke over two lines" in line and "--debug" in line
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "data", "shapes"])


@pytest.mark.parametrize("make_error", [
    lambda: __import__("twig_jax.decode.buckets", fromlist=["x"]).InputError("prompt too long"),
    lambda: __import__("twig_jax.convert.llava", fromlist=["x"]).ConversionError("bad checkpoint"),
    lambda: __import__("twig_jax.twig.io", fromlist=["x"]).TwigFormatError("bad twig"),
    lambda: __import__("twig_jax.twig.config", fromlist=["x"]).TwigConfigError("bad R"),
    lambda: __import__("twig_jax.eval.evaluate", fromlist=["x"]).EvalFileError("q.jsonl:3: bad line"),
    lambda: __import__("twig_jax.model.config", fromlist=["x"]).ConfigError("bad config"),
    lambda: FileNotFoundError(2, "No such file or directory", "x.jsonl"),
    lambda: json.JSONDecodeError("Expecting value", "{", 0),
])
def test_project_errors_are_bad_input_in_one_line(monkeypatch, capsys, make_error):
    from twig_jax.cli import main as cli

    err_obj = make_error()

    def failing(argv):
        raise err_obj

    monkeypatch.setitem(cli.COMMANDS, "eval", cli.Command(failing, "test"))
    code, err = run_cli(["eval"], capsys)
    assert code == 2
    assert _one_error_line(err).startswith("twig-jax eval: error: ")


def test_usage_errors_are_one_line(capsys):
    code, err = run_cli(["data", "shapes", "--out", "x", "--n", "many"], capsys)
    assert code == 2
    assert "--n" in _one_error_line(err)
    code, err = run_cli(["data", "shapes", "--out", "x", "--n", "-1"], capsys)  # the data generator's check
    assert code == 2
    assert "n_train=-1" in _one_error_line(err)


def test_prune_viz_missing_image_is_one_line_before_loading(tmp_path, capsys):
    code, err = run_cli(["prune-viz", "--model", str(tmp_path / "no-model"), "--image", str(tmp_path / "x.png"),
                         "--prompt", "hi", "--R", "4", "--out", str(tmp_path / "p.png")], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "x.png" in line and "no-model" not in line


def test_prune_viz_refuses_decoding_flags(tmp_path, capsys):
    code, err = run_cli(["prune-viz", "--model", str(tmp_path / "m"), "--image", "x.png", "--prompt", "hi",
                         "--R", "4", "--out", "p.png", "--draft-len", "3"], capsys)
    assert code == 2 and "--draft-len" in _one_error_line(err)


def test_demo_bad_question_file_is_one_line(saved, tmp_path, capsys):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question_id": 1, "image": "gone.png", "text": "hi ?"}) + "\n")
    code, err = run_cli(["demo", "--model", saved["model_dir"], "--questions", str(qfile), "--images",
                         str(tmp_path)], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert f"{qfile}:1" in line and "gone.png" in line


def _bare_milvlg(saved, path):
    """The fixture's twig as an official MILVLG checkpoint: the PyTorch-layout keys, no metadata."""
    import numpy as np
    from safetensors.numpy import save_file

    from twig_jax.twig.io import twig_to_milvlg

    save_file({k: np.asarray(v, np.float32) for k, v in twig_to_milvlg(saved["twig"]).items()}, str(path))
    return str(path)


def test_bare_milvlg_twig_loads_with_flags(saved, reference, tmp_path, capsys):
    from twig_jax.twig.io import load_twig_any

    twig_dir = tmp_path / "milvlg"
    twig_dir.mkdir()
    _bare_milvlg(saved, twig_dir / "model.safetensors")
    text_cfg = saved["model"].cfg.text

    # the Python API: T from the keys, K and R given, Kf defaults to 3/4 of the depth
    twig, tc = load_twig_any(str(twig_dir), text_cfg, K=1, R=16)
    assert (tc.K, tc.T, tc.R, tc.Kf, tc.p_head) == (1, 2, 16, 3, False) and twig.twig_cfg == tc

    from twig_jax.twig.io import TwigFormatError

    with pytest.raises(TwigFormatError, match="K") as e:
        load_twig_any(str(twig_dir), text_cfg, R=16)
    assert "T=2" in str(e.value)
    with pytest.raises(TwigFormatError, match="R_bar"):
        load_twig_any(str(twig_dir), text_cfg, K=1)

    # the CLI: the same answers as the fixture's orbax twig with the same settings
    out = tmp_path / "answers.jsonl"
    code, err = run_cli(["generate", "--model", saved["model_dir"], "--twig", str(twig_dir), "--K", "1", "--Kf", "3",
                         "--R", "16", "--draft-len", "4", "--theta", "0.05", "--jsonl", saved["qfile"],
                         "--images", str(saved["root"]), "--out", str(out), "--max-new-tokens", str(MAX_NEW),
                         "--batch-size", "1"], capsys)
    assert code == 0, err
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert texts == [a.text for a, _ in reference]

    # without K: one line naming what is missing
    code, err = run_cli(["generate", "--model", saved["model_dir"], "--twig", str(twig_dir / "model.safetensors"),
                         "--R", "16", "--image", saved["images"][0], "--prompt", "hi"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "--K" in line and "model.safetensors" in line
    assert os.path.isfile(twig_dir / "model.safetensors")


@pytest.mark.parametrize("mesh, says", [("data=3", "needs 3 devices"), ("data=2,pipe=2", "bad mesh entry"),
                                        ("tensor=0", "must be >= 1")])
def test_bad_mesh_is_one_line(saved, mesh, says, capsys):
    """--mesh that cannot be built on this machine's devices: one line naming it, exit 2."""
    code, err = run_cli(["generate", "--model", saved["model_dir"], "--image", saved["images"][0], "--prompt", "hi",
                         "--mesh", mesh], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith("twig-jax generate: error:") and says in line
