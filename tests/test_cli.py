"""The command line: help everywhere, real numbers, one-line errors."""

import subprocess
import sys

import pytest
import torch

from resforge.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in _subcommands():
        assert name in out


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_useful_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"resforge {command}" in out and len(out.splitlines()) >= 3


def test_info_prints_the_counts(capsys):
    assert main(["info", "resnet50"]) == 0
    out = capsys.readouterr().out
    assert "25,557,032" in out and "4.09 GMACs" in out and "2048x7x7" in out


def test_models_lists_the_family(capsys):
    assert main(["models"]) == 0
    assert "resnext50_32x4d" in capsys.readouterr().out


def test_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    for args in (["info", "resnet5"], ["info", "resnet18", "--pretrained", str(bad)]):
        r = subprocess.run([sys.executable, "-m", "resforge", *args], capture_output=True, text=True)
        assert r.returncode == 2
        assert r.stderr.startswith("resforge: error: ") and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_info_loads_pretrained_and_reports_adaptation(tmp_path, capsys):
    import resforge

    path = tmp_path / "w.pth"
    torch.save(resforge.create_model("resnet18", width=0.25).state_dict(), path)
    assert main(["info", "resnet18", "--width", "0.25", "--pretrained", str(path), "--num-classes", "3",
                 "--in-chans", "1", "--img-size", "32"]) == 0
    out = capsys.readouterr()
    assert "1 input channel" in out.out
