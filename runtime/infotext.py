"""Generation parameters as PNGs carry them, in AUTOMATIC1111's format (its "infotext"), which model sites and
the web UI's PNG Info read:

    masterpiece, (red hair:1.3)
    Negative prompt: blurry
    Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Clip skip: 2

The prompt is every line before the one that starts with "Negative prompt:", the negative prompt the lines
from there; the last line holds the settings when it has at least three `key: value` pairs (a value with a
comma is quoted as JSON). `generation_options` turns the settings into coreml-generate's options.
"""
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import GenerationError
from .sampler_names import a1111_name
from .schedulers import SCHEDULERS

logger = logging.getLogger("coreml_sd.runtime")
NEGATIVE_PREFIX = "Negative prompt:"
_SETTING = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass
class Infotext:
    prompt: str = ""
    negative_prompt: str = ""
    settings: dict[str, str] = field(default_factory=dict)


def parameters_text(prompt: str, negative_prompt: str, settings: dict[str, object]) -> str:
    """The infotext a generation's PNG carries (what `parse_infotext` reads back)."""
    lines = [prompt] + ([f"{NEGATIVE_PREFIX} {negative_prompt}"] if negative_prompt else [])
    return "\n".join(lines + [", ".join(f"{key}: {value}" for key, value in settings.items())])


def parse_infotext(text: str) -> Infotext:
    *lines, last = text.strip().split("\n")
    if len(_SETTING.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative, line = True, line[len(NEGATIVE_PREFIX):].strip()
        (negative if in_negative else prompt).append(line)
    settings = {}
    for key, value in _SETTING.findall(last):
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # the web UI keeps such a value as it is written
        settings[key.strip()] = value
    return Infotext("\n".join(prompt), "\n".join(negative), settings)


def read_png_parameters(path: str | Path) -> Infotext:
    """The parameters a PNG carries; raises GenerationError when it is no image or carries none."""
    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except FileNotFoundError:
        raise GenerationError(f"no file at {path}; pass an existing PNG to --from-png") from None
    except (UnidentifiedImageError, OSError) as error:
        raise GenerationError(f"{path} is not an image this runtime can read ({error}); pass a PNG to --from-png") \
            from None
    if not isinstance(text, str) or not text.strip():
        raise GenerationError(f"{path} carries no generation parameters (no 'parameters' text in the PNG); pass a "
                              "PNG written by coreml-generate or AUTOMATIC1111's web UI")
    return parse_infotext(text)


def _number(info: dict[str, str], key: str, kind: type, source: str):
    try:
        return kind(info[key])
    except ValueError:
        raise GenerationError(f"{source}: {key} {info[key]!r} is not a number; pass the setting as an option") \
            from None


def generation_options(infotext: Infotext, source: str) -> dict[str, object]:
    """coreml-generate's options from a picture's parameters (only those it has); `source` names the file in
    messages. Settings this runtime has no counterpart for are left out."""
    settings = infotext.settings
    options: dict[str, object] = {"prompt": infotext.prompt, "negative_prompt": infotext.negative_prompt}
    for key, option, kind in (("Steps", "steps", int), ("CFG scale", "guidance_scale", float), ("Seed", "seed", int)):
        if key in settings:
            options[option] = _number(settings, key, kind, source)
    if "Size" in settings:
        size = _SIZE.match(settings["Size"])
        if size is None:
            raise GenerationError(f"{source}: Size {settings['Size']!r} is not WIDTHxHEIGHT; pass --width and --height")
        options["width"], options["height"] = int(size[1]), int(size[2])
    if "Sampler" in settings:
        sampler = settings["Sampler"]
        if sampler not in SCHEDULERS and a1111_name(sampler) is None:
            raise GenerationError(f"{source}: the sampler {sampler!r} has no scheduler here; pass --scheduler NAME "
                                  "(coreml-generate --list-schedulers)")
        options["scheduler"] = sampler
    schedule = settings.get("Schedule type", "Automatic")
    if schedule == "Karras":
        options["karras"] = True
    elif schedule != "Automatic":
        logger.warning("%s: the schedule type %r has no counterpart here; the sampler's own schedule is used",
                       source, schedule)
    if settings.get("Prompt syntax") in ("a1111", "compel"):
        options["prompt_syntax"] = settings["Prompt syntax"]
    if "Clip skip" in settings:
        options["clip_skip"] = _number(settings, "Clip skip", int, source)
    return options
