"""coreml-convert's command line (its faults are in tests/hardening)."""
from coreml_sd.converter.cli import main


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_list_models_names_the_aliases(capsys):
    code, text = run(capsys, "--list-models")
    assert code == 0
    for alias, hub_id in [
        ("sd-v1-4", "CompVis/stable-diffusion-v1-4"),
        ("sd-2-1-base", "stabilityai/stable-diffusion-2-1-base"),
        ("tiny", ""),
    ]:
        assert any(line.split()[0] == alias and hub_id in line for line in text.splitlines())
