"""The foundation's main job runs end to end and reports what it generated."""

import pytest

from gfo.run import cli, demo


@pytest.mark.slow
def test_demo_runs_and_learns(capsys):
    rows = demo.run(steps=30)
    greedy = [r for r in rows if r["decoding"] == "greedy"]
    assert len(greedy) == 3 and all(r["completion"] for r in greedy)
    assert float(rows[-1]["completion"]) < 3.0  # from ~5.6 (uniform over 259 bytes) at step 1


def test_cli_rejects_unknown_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["trian"])
    assert exit_info.value.code == 2
    assert "unknown command 'trian' (did you mean 'train'?)" in capsys.readouterr().err
