import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edge_vla.cli import COMMANDS, main


def test_every_command_has_help():
    runner = CliRunner()
    assert runner.invoke(main, ["--help"]).exit_code == 0
    for name in COMMANDS:
        res = runner.invoke(main, [name, "--help"])
        assert res.exit_code == 0, (name, res.output)
        assert "Usage" in res.output


def test_info_json_reports_versions_and_backends():
    res = CliRunner().invoke(main, ["info", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["versions"]["torch"].startswith("2.")
    assert report["backends"]["onnxruntime"]["usable"] is True
    assert report["backends"]["tensorrt"]["usable"] is False and report["backends"]["tensorrt"]["detail"]


def test_info_describes_a_checkpoint(tmp_path, tiny_vla):
    tiny_vla.save_pretrained(tmp_path / "ckpt")
    res = CliRunner().invoke(main, ["info", "--json", "--checkpoint", str(tmp_path / "ckpt")])
    assert res.exit_code == 0, res.output
    c = json.loads(res.output)["checkpoint"]
    assert c["preset"] == "tiny" and c["parameters"] > 1e6 and c["action_stats"]


def test_user_errors_exit_non_zero_with_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edge_vla.cli", "info", "--checkpoint", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "checkpoint not found" in lines[0] and "edge-vla train" in lines[0]


def test_unknown_command_suggests_help():
    res = CliRunner().invoke(main, ["trian"])
    assert res.exit_code != 0
