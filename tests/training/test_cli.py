"""The training commands (treeprobe train / make-shards / export-weights; the treeprobe-train alias):
documented options, clear errors."""

import argparse

import pytest

from treeprobe.errors import TreeprobeError
from treeprobe.training.cli import add_subcommands, build_parser, main


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = build_parser()._subparsers._group_actions[0]
    return dict(sub.choices)


def test_add_subcommands_adds_three_commands_with_funcs_to_any_parser():
    # the lead's `treeprobe` parser calls add_subcommands on its own subparsers object: the
    # commands must come with func(args) -> int (a missing set_defaults would only show there)
    p = argparse.ArgumentParser(prog="treeprobe")
    add_subcommands(p.add_subparsers(dest="command"))
    for argv in (["train", "--data", "d.csv", "--out", "o"], ["make-shards", "--data", "d.csv", "--out", "o"],
                 ["export-weights", "--ckpt", "a.pt", "--out", "b.pt"]):
        args = p.parse_args(argv)
        assert callable(args.func), argv
    assert "treeprobe train" in p._subparsers._group_actions[0].choices["train"].format_usage()


@pytest.mark.parametrize("command", ["train", "make-shards", "export-weights"])
def test_every_option_is_documented(command):
    p = _commands()[command]
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 8, action.dest
        assert "%(default)s" not in action.help or action.default is not None, action.dest


def test_defaults_come_from_the_functions_they_feed():
    # one number, not two: make-shards' defaults are make_shards'; --eval-permutations is evaluate's
    import inspect

    from treeprobe.training.evaluate import evaluate
    from treeprobe.training.shards import make_shards

    shards = _commands()["make-shards"].parse_args(["--data", "d", "--out", "o"])
    params = inspect.signature(make_shards).parameters
    assert shards.shard_size == params["shard_size"].default and shards.quality == params["quality"].default
    assert shards.shuffle_seed == params["shuffle_seed"].default
    train = _commands()["train"].parse_args(["--data", "d", "--out", "o"])
    assert train.eval_permutations == inspect.signature(evaluate).parameters["permutations"].default


def test_help_exits_cleanly(capsys):
    for argv in (["--help"], ["make-shards", "--help"], ["export", "--help"], ["export-weights", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "make-shards" in capsys.readouterr().out


def test_offline_pretrained_tag_fails_with_a_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o"), "--model", "ViT-B-16",
               "--pretrained", "openai", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("treeprobe: error: cannot load pretrained weights ViT-B-16/openai")
    assert "--pretrained /path/to/" in err and err.count("\n") == 1


def test_bad_inputs_fail_with_status_2(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["--data", "x.csv", "--out", str(tmp_path / "o"), "--model", "NoSuchNet", "-q"]) == 2
    assert "treeprobe: error: unknown open_clip architecture 'NoSuchNet'" in capsys.readouterr().err
    assert main(["--data", "x.csv", "--out", str(tmp_path / "o"), "--pretrained", "nosuchtag", "-q"]) == 2
    assert "neither a file nor an open_clip tag" in capsys.readouterr().err
    assert main(["--data", "x.csv", "--out", str(tmp_path / "o"), "--seed", "-1", "-q"]) == 2
    assert "--seed must be in [0, 2**32)" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "treeprobe: error: no such checkpoint file" in capsys.readouterr().err


def test_command_funcs_raise_treeprobe_error_for_the_main_cli(tmp_path):
    # under `treeprobe`, the lead's main() prints the error: the funcs must raise, not print
    args = build_parser().parse_args(["export-weights", "--ckpt", str(tmp_path / "none.pt"), "--out", "x.pt"])
    with pytest.raises(TreeprobeError, match="no such checkpoint file"):
        args.func(args)
