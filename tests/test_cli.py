"""The CLI skeleton: every subcommand exists and explains itself; errors are one line."""

from __future__ import annotations

import pytest

from radlens.cli import build_parser, main

SUBCOMMANDS = ("index", "search", "similar", "label", "calibrate", "train", "eval", "serve", "check")


def test_help_lists_all_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"radlens {name}" in capsys.readouterr().out


def test_parser_has_exactly_the_documented_commands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(SUBCOMMANDS) <= set(sub.choices)


def test_missing_index_is_a_one_line_error(tmp_path, capsys):
    assert main(["search", "lung", "--data-dir", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("radlens: error:") and "radlens index" in err and "Traceback" not in err


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    code = main(["index", str(tmp_path / "img"), "--data-dir", str(tmp_path / "d"), "--model",
                 str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert code == 1 and "no-model" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, missing, hint", [
    (["index", "SRC", "--engine", "ray"], "ray", "pip install 'radlens[ray]'"),
    (["serve", "--workers", "2"], "gunicorn", "pip install 'radlens[serve]'"),
])
def test_optional_scale_out_parts_say_how_to_install_them(argv, missing, hint, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("radlens: error:") and hint in err and "Traceback" not in err


def test_unusable_database_url_is_a_one_line_error(tmp_path, capsys):
    assert main(["index", str(tmp_path), "--data-dir", str(tmp_path / "d"), "--model", "radlens-mini",
                 "--db-url", "nosuchdb://x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("radlens: error:") and "database URL" in err and "Traceback" not in err


def test_the_embedded_default_imports_no_scale_out_part(tmp_path, tiny_model_dir):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.imagegen import gray_folder

    src = gray_folder(tmp_path / "src", 3)
    code = ("import sys; from radlens.cli import main; "
            f"rc = main(['index', {str(src)!r}, '--data-dir', {str(tmp_path / 'd')!r}, '--model', "
            f"{str(tiny_model_dir)!r}, '--workers', '0', '--no-progress']); "
            f"rc = rc or main(['search', 'x', '--data-dir', {str(tmp_path / 'd')!r}]); "
            "print(sorted(m for m in ('ray', 'psycopg', 'gunicorn') if m in sys.modules)); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv,words", [
    (["search", "lung", "-k", "0"], "-k: 0 must be 1 or more"),
    (["search", "lung", "-k", "ten"], "'ten' is not an integer"),
    (["serve", "--port", "99999"], "99999 is not a TCP port"),
    (["serve", "--max-upload-mb", "-1"], "-1 must be more than 0"),
    (["serve", "--heavy-requests", "0"], "0 must be 1 or more"),
    (["label", "x.png", "--threshold", "2"], "2 must lie in [0, 1]"),
    (["label", "x.png", "--threshold", "-1"], "-1 must lie in [0, 1]"),
    (["label", "x.png", "--threshold", "nan"], "'nan' is not a finite number"),
    (["index", "src", "--batch-size", "0"], "--batch-size: 0 must be 1 or more"),
    (["index", "src", "--workers", "-2"], "-2 must be 0 or more"),
    (["nonsense"], "invalid choice"),
])
def test_bad_arguments_are_one_line_errors_with_exit_1(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("radlens: error:") and words in err and len(err.strip().splitlines()) == 1
    assert "usage:" not in err


def test_label_needs_no_index_and_takes_what_the_user_knows(tmp_path, tiny_model_dir, capsys):
    """`radlens label` on a fresh machine: no data dir, no index; --modality/--body-part/--view decide where
    the labels apply instead of the model's guess, and the report's technique says so."""
    from tests.imagegen import gray_image

    gray_image(2, (128, 128)).save(tmp_path / "cxr.png")
    empty = tmp_path / "radlens-data"
    argv = ["label", str(tmp_path / "cxr.png"), "--model", str(tiny_model_dir), "--precision", "fp32",
            "--data-dir", str(empty), "--report", "md"]
    assert main([*argv, "--modality", "CR", "--body-part", "chest", "--view", "PA"]) == 0
    out = capsys.readouterr().out
    assert "## Technique\nCR of the chest (PA view)" in out and "no RadLens index" not in out
    assert not empty.exists()  # labelling one file writes nothing
    assert main([*argv, "--modality", "CT", "--body-part", "head"]) == 0
    assert "do not apply" in capsys.readouterr().out
    pdf = tmp_path / "cxr.pdf"
    argv[argv.index("md")] = "pdf"
    assert main([*argv, "--modality", "CR", "--body-part", "chest", "--out", str(pdf)]) == 0
    from pypdf import PdfReader

    text = PdfReader(pdf).pages[0].extract_text()
    assert "File: cxr.png" in text and str(tiny_model_dir.name) in text and "Threshold:" in text
    assert PdfReader(pdf).pages[0].images  # the thumbnail


def test_similar_by_indexed_id(engine, indexed_dir, monkeypatch, capsys):
    import json

    from radlens.commands import query

    monkeypatch.setattr(query, "open_engine", lambda args: engine)
    some = engine.text("x", k=1)[0]
    assert main(["similar", "--id", str(some.id), "-k", "4", "--json", "--data-dir", str(indexed_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image_id"] == some.id and len(out["results"]) == 4
    assert some.id not in {r["id"] for r in out["results"]}
    assert main(["similar", "--data-dir", str(indexed_dir)]) == 1
    assert "give an image file or --id N" in capsys.readouterr().err
