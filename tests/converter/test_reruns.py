"""Reruns skip what is up to date, convert what changed, and --force converts again."""
import json

from coreml_sd.converter.conversion import ConversionOptions, convert_model


def test_rerun_skips_then_converts_what_changed(tmp_path):
    output = tmp_path / "tiny"
    options = dict(model="tiny", output=output, components=("TextEncoder", "VAEDecoder"), validate=False)
    first = convert_model(ConversionOptions(**options))
    assert first.converted == ["TextEncoder", "VAEDecoder"]
    stamp = (output / "VAEDecoder.mlpackage" / "Manifest.json").stat().st_mtime_ns

    again = convert_model(ConversionOptions(**options))
    assert again.converted == [] and again.skipped == ["TextEncoder", "VAEDecoder"]
    assert (output / "VAEDecoder.mlpackage" / "Manifest.json").stat().st_mtime_ns == stamp

    # The text encoder has no attention rewrite, so only the VAE decoder depends on the choice.
    changed = convert_model(ConversionOptions(**options, attention_implementation="original"))
    assert changed.converted == ["VAEDecoder"] and changed.skipped == ["TextEncoder"]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["components"]["VAEDecoder"]["settings"]["attention_implementation"] == "original"

    forced = convert_model(ConversionOptions(**options, attention_implementation="original", force=True))
    assert forced.converted == ["TextEncoder", "VAEDecoder"]
    assert not list(output.glob(".partial-*"))
