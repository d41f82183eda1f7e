"""`twig-jax generate --jsonl ... --out FILE`: an existing FILE is never lost (refused without
--force / --resume, replaced atomically with --force, appended to with --resume), bad rows are
found before the model loads and reported by line and question_id (--skip-bad skips and counts
them), settings that would be ignored are refused in one line, and the summary says what ran."""

from __future__ import annotations

import json
import os

import pytest

from cli_fixtures import MAX_NEW, error_lines, run_cli, saved  # noqa: F401  (fixtures)

OLD = "".join(json.dumps({"question_id": f"old{i}", "text": "kept"}) + "\n" for i in range(5))


def _questions(saved, path, bad_line: int | None = None, n: int = 5):
    """n LLaVA-style rows q1..qn on the fixture's two images; row `bad_line` names a missing image."""
    names = [os.path.basename(p) for p in saved["images"]]
    with open(path, "w") as f:
        for i in range(1, n + 1):
            image = "missing.png" if i == bad_line else names[i % 2]
            f.write(json.dumps({"question_id": f"q{i}", "image": image, "text": f"is there a circle {i} ?"}) + "\n")
    return str(path)


def _generate(saved, qfile, out, *extra):
    return ["generate", "--model", saved["model_dir"], "--jsonl", qfile, "--images", str(saved["root"]),
            "--out", str(out), "--max-new-tokens", str(MAX_NEW), "--batch-size", "2", *extra]


def _answers(path) -> list[tuple[str, str]]:
    """(question_id, text) of every record in an answer file, in file order."""
    return [(r["question_id"], r["text"]) for r in map(json.loads, open(path).read().splitlines())]


def _summary(err: str) -> dict:
    return json.loads([line for line in err.splitlines() if line.startswith("{")][-1])


def test_existing_out_is_refused_before_any_work(saved, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    out.write_text(OLD)
    qfile = _questions(saved, tmp_path / "q.jsonl")
    argv = _generate(saved, qfile, out)
    argv[argv.index("--model") + 1] = str(tmp_path / "no-model")  # never reached
    code, err = run_cli(argv, capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert str(out) in line and "--force" in line and "--resume" in line
    assert out.read_text() == OLD
    code, err = run_cli(argv + ["--force", "--resume"], capsys)
    assert code == 2 and len(error_lines(err)) == 1


def test_bad_row_is_found_before_the_model_loads_and_out_is_kept(saved, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    out.write_text(OLD)
    qfile = _questions(saved, tmp_path / "q.jsonl", bad_line=4)
    argv = _generate(saved, qfile, out, "--force")
    argv[argv.index("--model") + 1] = str(tmp_path / "no-model")  # the rows are checked first
    code, err = run_cli(argv, capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert f"{qfile}:4" in line and "q4" in line and "missing.png" in line and "--skip-bad" in line
    assert out.read_text() == OLD


@pytest.mark.parametrize("row, problem", [
    (b"{not json\n", "not valid JSON"),
    (b'{"question_id": "q3", "image": "img0.png"}\n', "question"),
    (b'{"question_id": "q3", "image": "img0.png", "text": "caf\xe9 ?"}\n', "UTF-8"),
    (b'["q3", "img0.png"]\n', "JSON object"),
])
def test_malformed_rows_name_their_line(saved, tmp_path, capsys, row, problem):
    qfile = tmp_path / "q.jsonl"
    good = json.dumps({"question_id": "q1", "image": "img0.png", "text": "hi ?"}).encode() + b"\n"
    qfile.write_bytes(good + good.replace(b"q1", b"q2") + row)
    code, err = run_cli(["generate", "--model", str(tmp_path / "no-model"), "--jsonl", str(qfile), "--images",
                         str(saved["root"])], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert f"{qfile}:3" in line and problem in line


def test_skip_bad_answers_the_rest_and_counts(saved, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    qfile = _questions(saved, tmp_path / "q.jsonl", bad_line=4)
    code, err = run_cli(_generate(saved, qfile, out, "--skip-bad"), capsys)
    assert code == 0, err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in recs] == ["q1", "q2", "q3", "q5"]
    assert any(f"{qfile}:4" in line and "q4" in line for line in err.splitlines())
    summary = _summary(err)
    assert summary["skipped"] == 1 and summary["answered"] == 4 and summary["questions"] == 5
    # the summary says what ran: plain decoding keeps every visual token
    n = saved["model"].cfg.num_image_tokens
    assert (summary["method"], summary["ssd"], summary["R"]) == ("none", False, n)
    # progress: rows done of the rows to answer
    assert "generate: 4/4 rows (100%)" in err


def test_resume_appends_only_unanswered_rows(saved, tmp_path, capsys):
    qfile = _questions(saved, tmp_path / "q.jsonl")
    full = tmp_path / "full.jsonl"
    assert run_cli(_generate(saved, qfile, full), capsys)[0] == 0
    lines = full.read_text().splitlines(keepends=True)
    assert len(lines) == 5
    # a run killed after two rows, in the middle of writing the third
    out = tmp_path / "answers.jsonl"
    out.write_text("".join(lines[:2]) + lines[2][:17])
    code, err = run_cli(_generate(saved, qfile, out, "--resume"), capsys)
    assert code == 0, err
    assert out.read_text().startswith("".join(lines[:2]))  # the finished rows are kept as they were
    assert _answers(out) == _answers(full)  # the same answers, each once, in question order
    summary = _summary(err)
    assert (summary["resumed"], summary["answered"], summary["questions"]) == (2, 3, 5)
    # nothing left to do: the file is left as it is
    code, err = run_cli(_generate(saved, qfile, out, "--resume"), capsys)
    assert code == 0 and _answers(out) == _answers(full) and _summary(err)["answered"] == 0


def test_resume_needs_question_ids(saved, tmp_path, capsys):
    code, err = run_cli(["generate", "--model", str(tmp_path / "no-model"), "--jsonl", saved["qfile"], "--images",
                         str(saved["root"]), "--out", str(tmp_path / "a.jsonl"), "--resume"], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert f"{saved['qfile']}:2" in line and "question_id" in line


def test_force_replaces_atomically_and_a_failed_run_keeps_the_old_file(saved, tmp_path, capsys, monkeypatch):
    from twig_jax.pipeline import Pipeline

    qfile = _questions(saved, tmp_path / "q.jsonl")
    out = tmp_path / "answers.jsonl"
    out.write_text(OLD)
    real_answer, calls = Pipeline.answer, []

    def failing_answer(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real_answer(self, *a, **kw)

    monkeypatch.setattr(Pipeline, "answer", failing_answer)
    code, err = run_cli(_generate(saved, qfile, out, "--force"), capsys)
    assert code == 1 and "device lost" in err
    assert out.read_text() == OLD  # replaced only when the run completes
    assert sorted(os.listdir(tmp_path)) == ["answers.jsonl", "q.jsonl"]  # no temporary file left

    # a new file keeps the answers of the batches that finished, so --resume can go on from there
    calls.clear()
    new = tmp_path / "new.jsonl"
    code, err = run_cli(_generate(saved, qfile, new), capsys)
    assert code == 1 and "--resume" in err
    assert [json.loads(line)["question_id"] for line in new.read_text().splitlines()] == ["q1", "q2"]
    monkeypatch.setattr(Pipeline, "answer", real_answer)
    assert run_cli(_generate(saved, qfile, new, "--resume"), capsys)[0] == 0
    assert [json.loads(line)["question_id"] for line in new.read_text().splitlines()] == [f"q{i}" for i in range(1, 6)]

    assert run_cli(_generate(saved, qfile, out, "--force"), capsys)[0] == 0
    assert _answers(out) == _answers(new)


@pytest.mark.parametrize("flags, words", [
    (["--temperature", "nan"], "temperature"),
    (["--temperature", "-1"], "temperature"),
    (["--temperature", "inf"], "temperature"),
    (["--temperature", "0.7", "--top-p", "0"], "top_p"),
    (["--temperature", "0.7", "--top-p", "1.5"], "top_p"),
    (["--temperature", "0.7", "--top-p", "nan"], "top_p"),
    (["--temperature", "0.7", "--top-k", "-1"], "top_k"),
    (["--top-p", "0.9"], "--temperature"),  # greedy decoding would ignore it
    (["--jsonl", "q.jsonl"], "--jsonl"),  # with --image/--prompt
    (["--no-color"], "--stream"),
    (["--skip-bad"], "--jsonl"),
    (["--resume"], "--out"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_bad_settings_are_one_line_errors_before_loading(saved, tmp_path, capsys, flags, words):
    code, err = run_cli(["generate", "--model", str(tmp_path / "no-model"), "--image", saved["images"][0],
                         "--prompt", "hi"] + flags, capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert words in line and "no-model" not in line


def test_sampling_config_refuses_values_it_cannot_sample_with():
    from twig_jax.decode.sampling import SamplingConfig, SamplingConfigError

    for kw in (dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=-0.5),
               dict(top_k=-1), dict(top_k=2.5), dict(top_p=0.0), dict(top_p=float("nan")), dict(top_p=1.01)):
        with pytest.raises(SamplingConfigError):
            SamplingConfig(**kw)
    assert issubclass(SamplingConfigError, ValueError)
    assert SamplingConfig(temperature=0.7, top_k=5, top_p=0.5).top_k == 5


@pytest.mark.parametrize("flags, words", [
    (["--K", "2"], "differs from the twig's K=1"),  # a K = 1 twig
    (["--select", "sample", "--method", "twig"], "sample"),
    (["--T", "3"], "T=3"),
    (["--draft-len", "3", "--no-ssd"], "--draft-len"),
    (["--score-rows", "text", "--method", "random", "--R", "4"], "--score-rows"),
    (["--method", "none", "--no-ssd"], "--twig"),
])
def test_twig_settings_that_would_be_ignored_exit_2_in_one_line(saved, capsys, flags, words):
    code, err = run_cli(["generate", "--model", saved["model_dir"], "--twig", saved["twig_dir"], "--image",
                         saved["images"][0], "--prompt", "hi"] + flags, capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert words in line


@pytest.mark.parametrize("flags, words", [
    (["--R", "4"], "method 'none' prunes nothing"),  # no --method, no twig
    (["--T", "2"], "--T"),
    (["--K", "2"], "--K"),
])
def test_settings_without_a_twig_exit_2_in_one_line(saved, capsys, flags, words):
    code, err = run_cli(["generate", "--model", saved["model_dir"], "--image", saved["images"][0], "--prompt", "hi"]
                        + flags, capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert words in line


def test_summary_reports_the_twig_settings_that_ran(saved, tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    code, err = run_cli(["generate", "--model", saved["model_dir"], "--twig", saved["twig_dir"], "--image",
                         saved["images"][0], "--prompt", "hi", "--max-new-tokens", str(MAX_NEW), "--R", "8",
                         "--select", "cover", "--out", str(out)], capsys)
    assert code == 0, err
    s = _summary(err)
    assert (s["method"], s["ssd"], s["K"], s["T"], s["Kf"], s["R"], s["select"]) == ("twig", True, 1, 2, 3, 8, "cover")
    assert (s["spec"], s["draft_len"], s["theta"], s["score_rows"]) == ("chain", 4, 0.05, "last")
    assert json.loads(out.read_text())["stats"]["kept_visual_tokens"] == 8


def test_a_tree_twig_reports_its_tree_and_refuses_chain_flags(saved, tmp_path, capsys):
    import dataclasses

    from twig_jax.twig.io import save_twig

    twig, chain_cfg = saved["twig"], saved["twig"].twig_cfg
    twig.twig_cfg = dataclasses.replace(chain_cfg, spec="tree", tree_width=2, tree_depth=2, tree_nodes=3)
    try:
        tree_dir = save_twig(twig, str(tmp_path / "tree-twig"))
    finally:
        twig.twig_cfg = chain_cfg
    argv = ["generate", "--model", saved["model_dir"], "--twig", tree_dir, "--image", saved["images"][0],
            "--prompt", "hi", "--max-new-tokens", str(MAX_NEW)]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    s = _summary(err)
    assert (s["spec"], s["tree_width"], s["tree_depth"], s["tree_nodes"], s["ssd"]) == ("tree", 2, 2, 3, True)
    assert "draft_len" not in s and "theta" not in s
    code, err = run_cli(argv + ["--theta", "0.3"], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "--theta" in line and "tree" in line
