from pathlib import Path

from setuptools import setup

# `converter` and `runtime` are taken on PyPI, so both install under the `coreml_sd` namespace.
SOURCE_ROOTS = {"coreml_sd.converter": "converter", "coreml_sd.runtime": "runtime"}


def subpackages(prefix: str, root: str) -> dict[str, str]:
    return {
        prefix + ".".join(("",) + init.parent.relative_to(root).parts).rstrip("."): str(init.parent)
        for init in sorted(Path(root).rglob("__init__.py"))
    }


package_dir = {}
for prefix, root in SOURCE_ROOTS.items():
    package_dir.update(subpackages(prefix, root))

setup(
    name="coreml-sd",
    version="0.1.0",
    description="Convert Stable Diffusion to Core ML for the Apple Neural Engine and generate images from the packages",
    python_requires=">=3.10",
    package_dir=package_dir,
    packages=sorted(package_dir),
    package_data={"coreml_sd.converter": ["data/vocab.json", "data/merges.txt", "data/demo/*.safetensors",
                                           "data/demo/README.md"],
                  "coreml_sd.runtime.server": ["static/*"]},
    install_requires=[
        "coremltools>=8.0",
        "numpy<2.4",
        "torch>=2.1",
        "diffusers>=0.30",
        "transformers>=4.40",
        "huggingface_hub>=0.23",
        "safetensors",
        "scipy",
        "pillow",
        "click>=8.1",
        # Stable Diffusion's invisible watermark, on by default; it brings opencv-python and PyWavelets
        "invisible-watermark>=0.2.0",
        "peft>=0.15",  # diffusers reads kohya LoRAs only with peft installed
    ],
    extras_require={
        # scikit-learn: the reference k-means for palettes; ray: the catalogue's tests; pytest-xdist and filelock:
        # two workers sharing the converted packages; einops: spandrel's, installed by scripts/test without torchvision;
        # the server's tests: a real A1111 client, and a browser driven over the system's Chromium; compel: the
        # reference for --prompt-syntax compel
        "test": ["pytest", "pytest-xdist", "filelock", "hypothesis", "scikit-learn", "ray>=2.40", "ruff", "einops",
                 "tomli; python_version < '3.11'", "fastapi>=0.110", "uvicorn>=0.29", "httpx", "webuiapi",
                 "playwright", "compel"],
        "upscalers": ["spandrel"],  # --upscaler: ESRGAN-family .pth models
        "compel": ["compel"],  # --prompt-syntax compel
        # coreml-convert --catalogue: conversions as Ray tasks; the catalogue file is TOML
        "cluster": ["ray>=2.40", "tomli; python_version < '3.11'"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],  # coreml-sd serve: AUTOMATIC1111's web API
    },
    entry_points={
        "console_scripts": [
            "coreml-convert=coreml_sd.converter.cli:main",
            "coreml-generate=coreml_sd.runtime.cli:main",
            "coreml-sd=coreml_sd.runtime.commandline:main",
            "coreml-watermark=coreml_sd.runtime.cli:watermark_main",
        ]
    },
)
