"""Facts fixed outside this project, written out here rather than derived from the code under test: NumPy's
RandomState draws (Apple's seeds), Apple's draw order for image-to-image, CLIP's published token ids, and the Swift
package's I/O contract."""
from pathlib import Path

import numpy as np
import pytest

import coreml_sd.converter
from coreml_sd.converter.families.sd import SD
from coreml_sd.runtime.contract import ModelDimensions
from coreml_sd.runtime.prompt import PromptEncoder
from coreml_sd.runtime.sampling import draw_noise, sample_encoder_latents

# np.random.RandomState(seed).randn(8), as NumPy has drawn them since its legacy generator was frozen.
RANDOM_STATE_DRAWS = {
    0: [1.764052345967664, 0.4001572083672233, 0.9787379841057392, 2.240893199201458,
        1.8675579901499675, -0.977277879876411, 0.9500884175255894, -0.1513572082976979],
    42: [0.4967141530112327, -0.13826430117118466, 0.6476885381006925, 1.5230298564080254,
         -0.23415337472333597, -0.23413695694918055, 1.5792128155073915, 0.7674347291529088],
}


@pytest.mark.parametrize("seed", RANDOM_STATE_DRAWS)
def test_initial_noise_is_random_state_in_float16(seed):
    noise = draw_noise(np.random.RandomState(seed), (1, 4, 1, 2))
    expected = np.float16(RANDOM_STATE_DRAWS[seed]).astype(np.float32).reshape(1, 4, 1, 2)
    np.testing.assert_array_equal(noise, expected)


def test_image_to_image_draws_the_noise_before_the_encoder_sample():
    """Apple's pipeline draws the initial noise first, then the VAE encoder's sample, from one random source."""
    rng = np.random.RandomState(0)
    noise = draw_noise(rng, (1, 4, 1, 1))
    moments = np.zeros((1, 8, 1, 1), np.float32)  # mean 0, log-variance 0: the sample is the draw itself
    sample = sample_encoder_latents(moments, rng, scaling_factor=1.0)
    draws = np.float16(RANDOM_STATE_DRAWS[0]).astype(np.float32)
    np.testing.assert_array_equal(noise.ravel(), draws[:4])
    np.testing.assert_array_equal(sample.ravel(), draws[4:])


# Token ids of CLIP ViT-L/14's tokenizer as published (start 49406, end 49407).
CLIP_TOKEN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "A Photo of a TREE!": [49406, 320, 1125, 539, 320, 2677, 256, 49407],
    "sunset over mountains": [49406, 3424, 962, 5873, 49407],
    "dog on a beach": [49406, 1929, 525, 320, 2117, 49407],
}


@pytest.mark.parametrize("prompt", CLIP_TOKEN_IDS)
def test_clip_token_ids(prompt):
    data = Path(coreml_sd.converter.__file__).parent / "data"
    ids = PromptEncoder(data / "vocab.json", data / "merges.txt", text_encoder=None).token_ids(prompt)[0]
    expected = CLIP_TOKEN_IDS[prompt]
    assert ids.tolist() == expected + [49407] * (77 - len(expected))


# Apple's StableDiffusion Swift package, SD 1.x at 512x512 (CLIP ViT-L: 768 wide), Unet batch 2.
SWIFT_CONTRACT = {
    "TextEncoder": ({"input_ids": ((1, 77), "float32")},
                    {"last_hidden_state": ((1, 77, 768), "float32"), "pooled_outputs": ((1, 768), "float32")}),
    "Unet": ({"sample": ((2, 4, 64, 64), "float16"), "timestep": ((2,), "float16"),
              "encoder_hidden_states": ((2, 768, 1, 77), "float16")},
             {"noise_pred": ((2, 4, 64, 64), "float32")}),
    "VAEDecoder": ({"z": ((1, 4, 64, 64), "float16")}, {"image": ((1, 3, 512, 512), "float32")}),
    "VAEEncoder": ({"x": ((1, 3, 512, 512), "float16")}, {"latent": ((1, 8, 64, 64), "float32")}),
}


@pytest.mark.parametrize("component", SWIFT_CONTRACT)
def test_swift_contract(component):
    """Exactly Apple's contract; with clip skip layers, the TextEncoder's further outputs come after those the Swift
    package reads, which keep their names, shapes and dtypes."""
    spec = SD.spec(component, ModelDimensions(768, 512, 512))
    inputs, outputs = SWIFT_CONTRACT[component]
    assert {t.name: (t.shape, t.dtype) for t in spec.inputs} == inputs
    assert {t.name: (t.shape, t.dtype) for t in spec.outputs} == outputs
    assert spec.file_name == f"{component}.mlpackage"
    deeper = SD.spec(component, ModelDimensions(768, 512, 512, clip_skip_layers=3))
    assert deeper.inputs == spec.inputs and deeper.outputs[: len(spec.outputs)] == spec.outputs
    extra = {t.name: (t.shape, t.dtype) for t in deeper.outputs[len(spec.outputs):]}
    assert extra == ({"hidden_embeds": ((1, 77, 768), "float32"), "hidden_embeds_3": ((1, 77, 768), "float32")}
                     if component == "TextEncoder" else {})
