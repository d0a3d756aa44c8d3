"""`coreml-generate` end to end on the tiny package: what it writes, and how it refuses bad input."""
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from coreml_sd.runtime.cli import main

PROMPT = "a photo of an astronaut riding a horse"
FAST = ["--steps", "1", "--scheduler", "ddim", "--backend", "reference"]  # one Unet call


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pngs(folder) -> list:
    return sorted(p for p in folder.rglob("*") if p.suffix == ".png" or p.name.endswith(".tmp"))


def test_writes_the_image_with_its_settings(tiny_package, tiny_runtime, tmp_path, capsys):
    output = tmp_path / "astronaut.png"
    code, out, err = run([PROMPT, "--model", str(tiny_package), "--seed", "3", "--negative-prompt", "blurry",
                          "--guidance-scale", "6", "-o", str(output), *FAST], capsys)
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"wrote {output} in ") and last.endswith(" s")
    written = Image.open(output)
    assert written.info["parameters"] == (
        f"{PROMPT}\nNegative prompt: blurry\n"
        f"Steps: 1, Sampler: DDIM, CFG scale: 6.0, Seed: 3, Size: 128x128, Model: {tiny_package.name}"
    )
    expected = tiny_runtime(
        PROMPT, negative_prompt="blurry", steps=1, scheduler="ddim", guidance_scale=6, seed=3, progress=False
    ).images[0]
    np.testing.assert_array_equal(np.asarray(written.convert("RGB")), np.asarray(expected))


def test_finds_the_only_package_and_names_the_output(tiny_package, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "packages").mkdir()
    (tmp_path / "packages" / "tiny").symlink_to(tiny_package)
    code, out, err = run([PROMPT, "--seed", "12", *FAST], capsys)
    assert code == 0, err
    assert (tmp_path / "outputs" / "a-photo-of-an-astronaut-riding-a-horse-12.png").is_file()


def test_packages_root_from_the_environment(tiny_package, tmp_path, monkeypatch, capsys):
    root = tmp_path / "elsewhere"
    root.mkdir()
    (root / "tiny").symlink_to(tiny_package)
    monkeypatch.setenv("COREML_SD_PACKAGES", str(root))
    code, out, err = run([PROMPT, "--model", "tiny", "--seed", "1", "-o", str(tmp_path / "out"), *FAST], capsys)
    assert code == 0, err
    assert [p.name for p in pngs(tmp_path / "out")] == ["a-photo-of-an-astronaut-riding-a-horse-1.png"]


def test_random_seed_is_printed_and_used(tiny_package, tmp_path, capsys):
    code, out, err = run([PROMPT, "--model", str(tiny_package), "-o", str(tmp_path), *FAST], capsys)
    assert code == 0, err
    seed = int(out.split()[1])
    assert f"--seed {seed}" in out.splitlines()[0]
    (image,) = pngs(tmp_path)
    assert image.name.endswith(f"-{seed}.png") and f"Seed: {seed}," in Image.open(image).info["parameters"]


def test_several_images_and_their_contact_sheet(tiny_package, tmp_path, capsys):
    code, out, err = run([PROMPT, "--model", str(tiny_package), "--seed", "5", "--num-images", "2",
                          "-o", str(tmp_path / "set.png"), *FAST], capsys)
    assert code == 0, err
    assert [p.name for p in pngs(tmp_path)] == ["set-5.png", "set-6.png", "set-grid.png"]
    grid = Image.open(tmp_path / "set-grid.png")
    assert grid.size == (256, 128)
    np.testing.assert_array_equal(np.asarray(grid)[:, 128:], np.asarray(Image.open(tmp_path / "set-6.png")))


def test_image_to_image(tiny_package, start_image, tmp_path, capsys):
    start_image.save(tmp_path / "start.png")
    code, out, err = run([PROMPT, "--model", str(tiny_package), "--seed", "2", "--image", str(tmp_path / "start.png"),
                          "--strength", "0.5", "--steps", "2", "--scheduler", "ddim", "-o", str(tmp_path / "out.png"),
                          "--backend", "reference"], capsys)
    assert code == 0, err
    assert "Denoising strength: 0.5" in Image.open(tmp_path / "out.png").info["parameters"]


def test_long_prompt_warns_in_one_line(tiny_package, tmp_path, capsys):
    code, out, err = run(["a " * 80, "--model", str(tiny_package), "--seed", "1", "-o", str(tmp_path), *FAST], capsys)
    assert code == 0
    assert err.strip().splitlines() == [
        "warning: the prompt is 82 tokens long but CLIP reads 77; the last 5 tokens were dropped ('a a a a a'); a "
        "package converted with coreml-convert --max-prompt-chunks 2 would keep them",
        "warning: 128x128 images are too small for the invisible watermark (256x256 at least): saved without it",
    ]


@pytest.fixture
def bad_places(tiny_package, start_image, tmp_path):
    """Packages with a part missing or broken, a start image, an empty folder; named in BAD_INPUTS' templates."""
    shutil.copytree(tiny_package, tmp_path / "no-unet", ignore=shutil.ignore_patterns("Unet.mlpackage"))
    shutil.copytree(tiny_package, tmp_path / "no-encoder", ignore=shutil.ignore_patterns("VAEEncoder.mlpackage"))
    shutil.copytree(tiny_package, tmp_path / "corrupt")
    (tmp_path / "corrupt" / "manifest.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    start_image.save(tmp_path / "start.png")
    start_image.resize((64, 64)).save(tmp_path / "small.png")
    return tmp_path


BAD_INPUTS = {  # argv after the prompt ({pkg}: the tiny package, {tmp}: bad_places) -> what the error says
    "height below the package's": (["--model", "{pkg}", "--height", "64"], "smaller than package"),
    "width not a multiple of 8": (
        ["--model", "{pkg}", "--width", "300"],
        "--width 300 is not a positive multiple of 8",
    ),
    "upscale below 1": (["--model", "{pkg}", "--upscale", "0.5"], "--upscale must be in [1, 8], not 0.5"),
    "upscale above 8": (["--model", "{pkg}", "--upscale", "9"], "--upscale must be in [1, 8], not 9"),
    "upscale strength alone": (["--model", "{pkg}", "--upscale-strength", "0.5"], "applies to --upscale only"),
    "upscaled image too small": (
        ["--model", "{pkg}", "--image", "{tmp}/small.png", "--upscale", "1.5"],
        "the upscaled image 96x96 (width x height) is smaller than package",
    ),
    "strength with image and upscale": (
        ["--model", "{pkg}", "--image", "{tmp}/start.png", "--upscale", "2", "--strength", "0.5"],
        "drop --strength",
    ),
    "upscaler missing": (
        ["--model", "{pkg}", "--upscale", "2", "--upscaler", "{tmp}/nowhere.pth"],
        "no upscaler model at",
    ),
    "tile overlap": (
        ["--model", "{pkg}", "--width", "256", "--tile-overlap", "12"],
        "--tile-overlap must be a multiple",
    ),
    "missing component": (["--model", "{tmp}/no-unet"], "lacks Unet (no Unet.mlpackage)"),
    "missing encoder": (["--model", "{tmp}/no-encoder", "--image", "{tmp}/start.png"], "has no VAEEncoder"),
    "corrupt manifest": (["--model", "{tmp}/corrupt"], "unreadable"),
    "folder without models": (["--model", "{tmp}/empty"], "is not a package"),
    "unknown package": (["--model", "sd-v9"], "no package named 'sd-v9'"),
    "unknown scheduler": (["--model", "{pkg}", "--scheduler", "DPM fast"], "unknown scheduler 'DPM fast'; choose from"),
    "strength above 1": (["--model", "{pkg}", "--image", "{tmp}/start.png", "--strength", "1.5"], "[0, 1]"),
    "strength below 0": (["--model", "{pkg}", "--image", "{tmp}/start.png", "--strength", "-0.1"], "[0, 1]"),
    "strength without image": (["--model", "{pkg}", "--strength", "0.5"], "add --image"),
    "image that is not one": (["--model", "{pkg}", "--image", "{pkg}/merges.txt"], "is not an image"),
    "image missing": (["--model", "{pkg}", "--image", "{tmp}/nowhere.png"], "no image at"),
    "unwritable output": (["--model", "{pkg}", "-o", "{tmp}/start.png/out.png"], "cannot write to"),
    "output not png": (["--model", "{pkg}", "-o", "{tmp}/out.jpg"], "give -o a .png name or a folder"),
    "unparseable steps": (["--model", "{pkg}", "--steps", "many"], "'many' is not a valid integer"),
    "zero steps": (["--model", "{pkg}", "--steps", "0"], "--steps must be at least 1"),
    "unknown compute unit": (["--model", "{pkg}", "--compute-unit", "NE"], "'NE' is not one of"),
}
if sys.platform != "darwin":
    BAD_INPUTS["core ml off macos"] = (
        ["--model", "{pkg}", "--backend", "coreml"],
        "Core ML backend runs only on macOS",
    )


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_no_file(case, tiny_package, bad_places, monkeypatch, capsys):
    template, message = BAD_INPUTS[case]
    argv = [arg.format(pkg=tiny_package, tmp=bad_places) for arg in template]
    monkeypatch.chdir(bad_places)  # the default output folder would be here
    if "--backend" not in argv:
        argv += ["--backend", "reference"]
    code, out, err = run([PROMPT, "--seed", "1", *argv], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], err
    assert [p.name for p in pngs(bad_places)] == ["small.png", "start.png"]


def test_several_packages_need_a_choice(tiny_package, tmp_path, monkeypatch, capsys):
    for name in ("tiny", "tiny-copy"):
        (tmp_path / name).symlink_to(tiny_package)
    monkeypatch.setenv("COREML_SD_PACKAGES", str(tmp_path))
    code, out, err = run([PROMPT, *FAST], capsys)
    assert code == 1
    assert err.strip() == f"Error: several packages in {tmp_path} (tiny, tiny-copy); choose one with --model NAME"


def test_console_script_error_is_one_line(tiny_package, tmp_path):
    """In a fresh interpreter, where the libraries' import-time notices would also show."""
    command = [
        sys.executable,
        "-c",
        "import sys; from coreml_sd.runtime.cli import main; sys.exit(main())",
        PROMPT,
        "--model",
        str(tiny_package),
        "--height",
        "64",
        "-o",
        str(tmp_path),
        *FAST,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines() == [
        f"Error: the size 128x64 (width x height) is smaller than package {tiny_package.name!r}'s 128x128; its "
        "models run at that size or, in overlapping tiles, larger"
    ]
    assert not pngs(tmp_path)


def test_upscale_writes_the_large_image_with_its_settings(tiny_package, tmp_path, capsys):
    output = tmp_path / "large.png"
    code, out, err = run(
        [
            PROMPT,
            "--model",
            str(tiny_package),
            "--seed",
            "2",
            "--upscale",
            "2",
            "--upscale-steps",
            "2",
            "--upscale-strength",
            "0.5",
            "-o",
            str(output),
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err
    written = Image.open(output)
    assert written.size == (256, 256)
    assert written.info["parameters"].endswith(
        f"Size: 256x256, Model: {tiny_package.name}, Denoising strength: 0.5, First pass size: 128x128, "
        "Hires upscale: 2, Hires steps: 2, Hires upscaler: Lanczos, Tile overlap: 32"
    )


@pytest.fixture
def spandrel(monkeypatch):
    """spandrel, whose registry imports torchvision for two architectures other than ESRGAN (LaMa, RestoreFormer);
    where torchvision cannot be imported (CPU-only torch builds have no matching wheel), those two names get
    placeholders so that the registry loads."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        functional = types.ModuleType("torchvision.transforms.functional")
        functional.InterpolationMode = functional.rotate = functional.normalize = None
        transforms = types.ModuleType("torchvision.transforms")
        transforms.functional = functional
        torchvision = types.ModuleType("torchvision")
        torchvision.transforms = transforms
        for name, module in [
            ("torchvision", torchvision),
            ("torchvision.transforms", transforms),
            ("torchvision.transforms.functional", functional),
        ]:
            monkeypatch.setitem(sys.modules, name, module)
    return pytest.importorskip("spandrel")


def test_model_upscaler(spandrel, tiny_package, start_image, tmp_path, capsys):
    """A tiny ESRGAN (RRDBNet) saved as a .pth, read by spandrel, enlarges the image before the refinement."""
    import torch
    from spandrel.architectures.ESRGAN import ESRGAN

    from coreml_sd.runtime.upscaling import ModelUpscaler

    torch.manual_seed(0)
    torch.save(
        ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2).state_dict(), tmp_path / "tiny-esrgan.pth"
    )
    upscaler = ModelUpscaler(tmp_path / "tiny-esrgan.pth")
    assert upscaler.name == "tiny-esrgan.pth (ESRGAN 2x)"
    with torch.inference_mode():
        expected = upscaler.model.model(
            torch.from_numpy(np.asarray(start_image, np.float32).transpose(2, 0, 1)[None] / 255)
        )
    enlarged = np.asarray(upscaler(start_image, (256, 256)), np.float64) / 255
    np.testing.assert_allclose(enlarged, expected.clamp(0, 1)[0].numpy().transpose(1, 2, 0), atol=0.5 / 255 + 1e-6)

    start_image.save(tmp_path / "start.png")
    output = tmp_path / "large.png"
    code, out, err = run(
        [
            PROMPT,
            "--model",
            str(tiny_package),
            "--seed",
            "2",
            "--image",
            str(tmp_path / "start.png"),
            "--upscale",
            "2",
            "--upscaler",
            str(tmp_path / "tiny-esrgan.pth"),
            "-o",
            str(output),
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err
    assert Image.open(output).size == (256, 256)
    assert "Hires upscaler: tiny-esrgan.pth (ESRGAN 2x), Tile overlap: 32" in Image.open(output).info["parameters"]


def test_unreadable_upscaler_is_one_line_and_no_file(spandrel, tiny_package, tmp_path, capsys):
    import torch

    torch.save({"not.a.model": torch.zeros(3)}, tmp_path / "weights.pth")
    code, out, err = run(
        [
            PROMPT,
            "--model",
            str(tiny_package),
            "--upscale",
            "2",
            "--upscaler",
            str(tmp_path / "weights.pth"),
            "-o",
            str(tmp_path),
            *FAST,
        ],
        capsys,
    )
    assert code == 1
    (line,) = err.strip().splitlines()
    assert line.startswith(f"Error: cannot read {tmp_path / 'weights.pth'} as an upscaler model (") and line.endswith(
        "); pass an ESRGAN-family .pth file"
    )
    assert not pngs(tmp_path)
