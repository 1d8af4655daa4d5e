"""treeprobe-train command line: documented options, clear errors."""

import argparse

import pytest

from training.cli import export_parser, main, shards_parser, train_parser


@pytest.mark.parametrize("make", [train_parser, shards_parser, export_parser])
def test_every_option_is_documented(make):
    p = make()
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 8, action.dest


def test_help_exits_cleanly(capsys):
    for argv in (["--help"], ["make-shards", "--help"], ["export", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "make-shards" in capsys.readouterr().out


def test_offline_pretrained_tag_fails_with_a_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o"), "--model", "ViT-B-16",
               "--pretrained", "openai", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: could not fetch weights for ViT-B-16 / openai")
    assert "--pretrained /path/to/" in err


def test_bad_inputs_fail_with_status_2(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["--data", "x.csv", "--out", str(tmp_path / "o"), "--model", "NoSuchNet", "-q"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["--data", "x.csv", "--out", str(tmp_path / "o"), "--pretrained", "nosuchtag", "-q"]) == 2
    assert "neither a file nor an open_clip tag" in capsys.readouterr().err
