"""`twig-jax generate` with a twig: JSONL answers equal TwigGenerator's greedy answers; --stream
prints the same answer with accepted drafts marked; SSD without a twig is a clear error."""

from __future__ import annotations

import io
import json
import os
import re

import pytest

from cli_fixtures import MAX_NEW, QUESTIONS, reference, saved  # noqa: F401  (fixtures)


def test_generate_jsonl_matches_twig_generator(saved, reference, tmp_path):
    from twig_jax.cli.main import main

    out = tmp_path / "answers.jsonl"
    rc = main(["generate", "--model", saved["model_dir"], "--twig", saved["twig_dir"], "--jsonl", saved["qfile"],
               "--images", str(saved["root"]), "--out", str(out), "--max-new-tokens", str(MAX_NEW),
               "--batch-size", "1"])
    assert rc == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in recs] == QUESTIONS
    assert recs[0]["question_id"] == 7 and recs[0]["image"] == "img0.png"
    for rec, (ans, stats) in zip(recs, reference):
        assert rec["text"] == ans.text
        assert rec["num_tokens"] == len(ans.tokens)
        s = rec["stats"]
        assert s["kept_visual_tokens"] == 16
        assert s["rounds"] == ans.stats["rounds"] and s["accepted"] == ans.stats["accepted"]
        assert 0.0 <= s["acceptance_rate"] <= 1.0 and s["tokens_per_round"] >= 1.0
        assert s["batch_seconds"] > 0


def test_stream_matches_and_marks_accepted(saved, reference, tmp_path, capsys):
    from twig_jax.cli.main import main

    out = tmp_path / "stream.jsonl"
    rc = main(["generate", "--model", saved["model_dir"], "--twig", saved["twig_dir"], "--image", saved["images"][0],
               "--prompt", QUESTIONS[0], "--max-new-tokens", str(MAX_NEW), "--stream", "--no-color",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out.strip()
    ans, _ = reference[0]
    rec = json.loads(out.read_text())
    assert rec["text"] == ans.text and rec["num_tokens"] == len(ans.tokens)
    assert "\x1b[" not in printed
    assert re.sub(r"[\[\]]", "", printed).strip() == ans.text
    # one [..] group per round with accepted drafts
    assert printed.count("[") <= ans.stats["rounds"]


def test_only_streaming_traces_host_callbacks(saved):
    """generate() stays one while_loop without host callbacks; the streaming executable has them."""
    import jax
    import jax.numpy as jnp

    from twig_jax.pipeline import Pipeline
    from twig_jax.decode.sampling import SamplingConfig
    from twig_jax.decode.sink import dispatch
    from twig_jax.decode.generator import TwigGenerator

    for ssd in (True, False):
        gen = TwigGenerator(saved["model"], saved["twig"], saved["tc"], method="twig", ssd=ssd)
        pipe = Pipeline(saved["model"], saved["tok"], generator=gen)
        tokens, lengths, active, pv, out_len = gen.prepare(pipe.encode([QUESTIONS[0]]),
                                                            pipe.image_processor([saved["images"][0]]), MAX_NEW)
        args = (gen.state, gen.twig_state, gen.weights, tokens, lengths, pv, active, jax.random.key(0),
                jnp.int32(MAX_NEW), jnp.int32(0))
        kw = dict(out_len=out_len, sampling=SamplingConfig(), eos_ids=(2,), pad_id=3)
        plain = str(gen._gen.trace(*args, **kw, on_step=None).jaxpr)
        assert "while" in plain and "callback" not in plain
        assert "io_callback" in str(gen._gen.trace(*args, **kw, on_step=dispatch).jaxpr)


def test_stream_printer_highlights():
    from twig_jax.decode.stream import ACCEPT_ON, ANSI_OFF, StreamPrinter

    class Tok:
        eos_token_id = 2
        words = {5: "a", 6: "b", 7: "c", 8: "d"}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(self.words[i] for i in ids)

    buf = io.StringIO()
    p = StreamPrinter(Tok(), out=buf, color=False)
    p([5], 0)
    p([6, 7, 8], 2)
    p([2], 0)
    assert buf.getvalue() == "a[ b c] d"
    buf = io.StringIO()
    p = StreamPrinter(Tok(), out=buf, color=True)
    p([5, 6], 1)
    assert buf.getvalue() == f"{ACCEPT_ON}a{ANSI_OFF} b"


@pytest.mark.parametrize("extra, msg", [
    (["--ssd"], "--ssd needs --twig"),
    (["--method", "twig"], "--method twig (TTP) needs --twig"),
])
def test_twig_flags_without_twig_are_clear_errors(saved, capsys, extra, msg):
    from twig_jax.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", saved["model_dir"], "--image", saved["images"][0], "--prompt", "hi"] + extra)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_make_generator_rejects_ssd_without_twig(saved):
    from twig_jax.decode.generator import make_generator
    from twig_jax.twig.config import TwigConfigError

    with pytest.raises(TwigConfigError, match="needs a twig"):
        make_generator(saved["model"], None, None, method="fastv", ssd=True)


def test_bench_dispatch(monkeypatch):
    """`twig-jax bench --methods ...` goes to twig_jax.bench.methods."""
    import twig_jax.bench.methods as bt
    from twig_jax.cli import main as cli

    seen = {}
    monkeypatch.setattr(bt, "main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert cli.main(["bench", "--methods", "plain,twig", "--config", "tiny"]) == 0
    assert seen["argv"] == ["--methods", "plain,twig", "--config", "tiny"]
    assert os.path.basename(bt.__file__) == "methods.py"


def test_help_lists_every_command_with_a_summary(capsys):
    from twig_jax.cli.main import COMMANDS, main

    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, command in COMMANDS.items():
        assert command.summary and "\n" not in command.summary
        assert any(line.split()[:1] == [name] and command.summary in line for line in lines), name
    assert main(["no-such-command"]) == 2


def test_tree_drafting_from_the_cli_and_streamed(saved, reference, capsys, tmp_path):
    """--spec tree answers as chain SSD does (both are greedy decoding of the pruned model), streamed
    too, and the output says it ran a tree."""
    from tests.cli.cli_fixtures import run_cli

    out = tmp_path / "tree.jsonl"
    for extra, path in (([], out), (["--stream", "--no-color"], tmp_path / "tree_stream.jsonl")):
        code, err = run_cli(["generate", "--model", saved["model_dir"], "--twig", saved["twig_dir"], "--image",
                             saved["images"][0], "--prompt", QUESTIONS[0], "--max-new-tokens", str(MAX_NEW),
                             "--spec", "tree", "--tree-width", "2", "--tree-depth", "3", "--tree-nodes", "5",
                             "--out", str(path), *extra], capsys)
        assert code == 0, err
        rec = json.loads(path.read_text())
        assert rec["text"] == reference[0][0].text
    code, err = run_cli(["generate", "--model", saved["model_dir"], "--twig", saved["twig_dir"], "--image",
                         saved["images"][0], "--prompt", QUESTIONS[0], "--spec", "tree", "--tree-width", "2",
                         "--tree-depth", "3", "--tree-nodes", "20"], capsys)
    assert code == 2 and "tree nodes 20" in err and len(err.strip().splitlines()) <= 2


def test_min_new_tokens_from_the_cli(saved, capsys, tmp_path, monkeypatch):
    """--min-new-tokens reaches the decoder (whose rule is tested against Hugging Face generate in
    tests/decode), and a value above --max-new-tokens is one line, exit 2."""
    from tests.cli.cli_fixtures import run_cli
    from twig_jax.decode.generator import TwigGenerator

    seen = []
    original = TwigGenerator.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("min_new_tokens"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TwigGenerator, "generate", spy)
    code, err = run_cli(["generate", "--model", saved["model_dir"], "--twig", saved["twig_dir"], "--image",
                         saved["images"][0], "--prompt", QUESTIONS[0], "--max-new-tokens", str(MAX_NEW),
                         "--min-new-tokens", "5", "--out", str(tmp_path / "a.jsonl")], capsys)
    assert code == 0, err
    assert seen and set(seen) == {5}
    code, err = run_cli(["generate", "--model", saved["model_dir"], "--image", saved["images"][0], "--prompt",
                         QUESTIONS[0], "--max-new-tokens", "4", "--min-new-tokens", "5"], capsys)
    assert code == 2 and "--min-new-tokens" in err
