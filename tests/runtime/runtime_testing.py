"""Helpers shared by the runtime tests: image comparison."""
import numpy as np

PSNR_THRESHOLD_DB = 35.0


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    image, reference = np.asarray(image, np.float64), np.asarray(reference, np.float64)
    rmse = np.sqrt(np.mean((image - reference) ** 2))
    return float(20 * np.log10((np.abs(reference).max() + 1e-5) / (rmse + 1e-10)))


def pixels(image) -> np.ndarray:
    """A PIL image as floats in [0, 1], the range diffusers' output_type="np" uses."""
    return np.asarray(image, np.float64) / 255
