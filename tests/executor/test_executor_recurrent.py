"""lstm and gru programs against PyTorch's LSTM and GRU (weights re-laid out from MIL's gate order) and, for MIL's
reset-before GRU that PyTorch lacks, a NumPy loop. Float32 programs; tolerances are float32 rounding."""
import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb

from executor_testing import random, run_mil

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
T, B, IN, H = 5, 2, 3, 4


def _reorder_gates(weights: torch.Tensor, order: list[int]) -> np.ndarray:
    """Stacked gate blocks [gates * H, ...] reordered: block k of the result is block order[k] of `weights`."""
    blocks = weights.detach().numpy().reshape(-1, H, *weights.shape[1:])
    return np.ascontiguousarray(np.concatenate([blocks[k] for k in order]))


LSTM_ORDER = [0, 1, 3, 2]  # PyTorch i, f, g(z), o <-> MIL i, f, o, z (its own inverse)


def _lstm_parameters(layer: torch.nn.LSTM, suffix: str = "") -> dict:
    weights = {name: getattr(layer, f"{name}_l0{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    return dict(
        weight_ih=_reorder_gates(weights["weight_ih"], LSTM_ORDER),
        weight_hh=_reorder_gates(weights["weight_hh"], LSTM_ORDER),
        bias=_reorder_gates(weights["bias_ih"] + weights["bias_hh"], LSTM_ORDER),
    )


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("output_sequence", [True, False])
def test_lstm_matches_torch(tmp_path, direction, output_sequence):
    torch.manual_seed(0)
    bidirectional = direction == "bidirectional"
    directions = 2 if bidirectional else 1
    layer = torch.nn.LSTM(IN, H, bidirectional=bidirectional)
    x, h0, c0 = random((T, B, IN), seed=1), random((directions, B, H), seed=2), random((directions, B, H), seed=3)
    parameters = _lstm_parameters(layer)
    if bidirectional:
        parameters.update({f"{name}_back": value for name, value in _lstm_parameters(layer, "_reverse").items()})

    def body(x, initial_h, initial_c):
        return mb.lstm(x=x, initial_h=initial_h, initial_c=initial_c, direction=direction,
                       output_sequence=output_sequence, **parameters)

    # MIL states put the directions side by side: [B, directions * H].
    def side_by_side(states):
        return np.concatenate(list(states), axis=-1)
    inputs = dict(x=x, initial_h=side_by_side(h0), initial_c=side_by_side(c0))
    sequence, h, c = run_mil(body, inputs, tmp_path, target=ct.target.iOS17)

    # A reverse layer reads x backwards and emits its states in reading order.
    reading = np.flip(x, 0).copy() if direction == "reverse" else x
    with torch.no_grad():
        states = (torch.from_numpy(h0), torch.from_numpy(c0))
        expected, (expected_h, expected_c) = layer(torch.from_numpy(reading), states)
    expected_h, expected_c = side_by_side(expected_h.numpy()), side_by_side(expected_c.numpy())
    expected = expected.numpy() if output_sequence else expected_h[None]
    np.testing.assert_allclose(sequence, expected, **TOLERANCE)
    np.testing.assert_allclose(h, expected_h, **TOLERANCE)
    np.testing.assert_allclose(c, expected_c, **TOLERANCE)


GRU_ORDER = [0, 2, 1]  # PyTorch r, z, n -> MIL r, o(n), z


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_gru_reset_after_matches_torch(tmp_path, direction):
    """iOS 18's reset_after GRU with separate input and recurrent biases is PyTorch's GRU."""
    torch.manual_seed(0)
    layer = torch.nn.GRU(IN, H)
    x, h0 = random((T, B, IN), seed=1), random((B, H), seed=2)
    parameters = dict(
        weight_ih=_reorder_gates(layer.weight_ih_l0, GRU_ORDER),
        weight_hh=_reorder_gates(layer.weight_hh_l0, GRU_ORDER),
        input_bias=_reorder_gates(layer.bias_ih_l0, GRU_ORDER),
        bias=_reorder_gates(layer.bias_hh_l0, GRU_ORDER),
    )
    def body(x, initial_h):
        return mb.gru(x=x, initial_h=initial_h, direction=direction, output_sequence=True,
                                           reset_after=True, **parameters)
    sequence, h = run_mil(body, dict(x=x, initial_h=h0), tmp_path, target=ct.target.iOS18)

    reading = np.flip(x, 0).copy() if direction == "reverse" else x
    with torch.no_grad():
        expected, expected_h = layer(torch.from_numpy(reading), torch.from_numpy(h0[None]))
    np.testing.assert_allclose(sequence, expected.numpy(), **TOLERANCE)
    np.testing.assert_allclose(h, expected_h[0].numpy(), **TOLERANCE)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_gru_reset_before_matches_numpy(tmp_path, direction):
    """MIL's original GRU resets the state before the recurrent product: o = tanh(W_io x + W_ho (r * h) + b_o)."""
    x, h0 = random((T, B, IN), seed=1), random((B, H), seed=2)
    weight_ih, weight_hh, bias = random((3 * H, IN), seed=3), random((3 * H, H), seed=4), random((3 * H,), seed=5)
    def body(x, initial_h):
        return mb.gru(x=x, initial_h=initial_h, weight_ih=weight_ih, weight_hh=weight_hh, bias=bias,
                                           direction=direction, output_sequence=False)
    last, h = run_mil(body, dict(x=x, initial_h=h0), tmp_path)

    def sigmoid(v):
        return 1 / (1 + np.exp(-v))
    gate_blocks = (np.split(a.astype(np.float64), 3) for a in (weight_ih, weight_hh, bias))
    (w_ir, w_io, w_iz), (w_hr, w_ho, w_hz), (b_r, b_o, b_z) = gate_blocks
    expected = h0.astype(np.float64)
    for step in (range(T) if direction == "forward" else reversed(range(T))):
        x_t = x[step].astype(np.float64)
        r = sigmoid(x_t @ w_ir.T + expected @ w_hr.T + b_r)
        z = sigmoid(x_t @ w_iz.T + expected @ w_hz.T + b_z)
        o = np.tanh(x_t @ w_io.T + (r * expected) @ w_ho.T + b_o)
        expected = (1 - z) * o + z * expected
    np.testing.assert_allclose(last, expected[None], **TOLERANCE)
    np.testing.assert_allclose(h, expected, **TOLERANCE)


def test_float16_lstm_rounds_once_at_its_outputs(tmp_path):
    """A float16 program's gates accumulate in float32 and its states stay float32 across steps, as Core ML's
    matrix products do: the outputs are the exact LSTM of the float16 inputs, rounded once to float16."""
    torch.manual_seed(0)
    layer = torch.nn.LSTM(IN, H).double()
    parameters = {name: value.astype(np.float16) for name, value in _lstm_parameters(layer).items()}
    x, h0, c0 = (random(shape, seed=seed).astype(np.float16) for seed, shape in enumerate([(T, B, IN), (B, H), (B, H)]))
    def body(x, initial_h, initial_c):
        return mb.lstm(x=x, initial_h=initial_h, initial_c=initial_c, output_sequence=True,
                                                       **parameters)
    sequence, h, c = run_mil(body, dict(x=x, initial_h=h0, initial_c=c0), tmp_path, target=ct.target.iOS17)

    # The reference runs in float64 on exactly the float16 weights the program holds.
    def wide(a):
        return torch.from_numpy(a.astype(np.float64))
    with torch.no_grad():
        for name, mil_name in [("weight_ih_l0", "weight_ih"), ("weight_hh_l0", "weight_hh"), ("bias_ih_l0", "bias")]:
            getattr(layer, name).copy_(torch.from_numpy(_reorder_gates(wide(parameters[mil_name]), LSTM_ORDER)))
        layer.bias_hh_l0.zero_()
        expected, (expected_h, expected_c) = layer(wide(x), (wide(h0)[None], wide(c0)[None]))
    for actual, exact in [(sequence, expected), (h, expected_h[0]), (c, expected_c[0])]:
        assert actual.dtype == np.float16
        rounded = exact.numpy().astype(np.float16)
        ulp = np.spacing(np.abs(rounded)).astype(np.float64)
        np.testing.assert_array_less(np.abs(actual.astype(np.float64) - rounded), ulp * 1.0001 + 1e-6)
