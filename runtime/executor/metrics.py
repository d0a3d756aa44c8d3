"""The accuracy figure every comparison in the project reports."""
import numpy as np


def psnr(reference: np.ndarray, actual: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, as Apple's ml-stable-diffusion reports it:
    20 log10((max |reference| + 1e-5) / (rmse + 1e-10)), the peak taken from the reference."""
    reference = np.asarray(reference, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if reference.shape != actual.shape:
        raise ValueError(f"psnr of arrays of different shapes: {reference.shape} and {actual.shape}")
    rmse = np.sqrt(np.mean((reference - actual) ** 2))
    return float(20 * np.log10((np.abs(reference).max() + 1e-5) / (rmse + 1e-10)))
