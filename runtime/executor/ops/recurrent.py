"""MIL recurrent layers (coremltools `ops/defs/iOS15/recurrent.py`, fp16 allowed from iOS 17 with the
same semantics, gru's `reset_after` and `input_bias` from iOS 18).

Shared conventions:

* x is [T, B, I] (time first); hidden and cell states are [B, H]; weights are [gates * H, I] (input)
  and [gates * H, H] (recurrent), gates stacked along the first axis; a gate pre-activation is
  x_t W_ih^T + h_{t-1} W_hh^T + bias.
* `direction="reverse"` reads x from t = T - 1 down to 0 and emits its outputs in that reading order
  (output[0] is the state after x[T - 1]), as coremltools' tests expect.
* `output_sequence=True` returns every step's hidden state, [T, B, H]; otherwise [1, B, H], the
  state after the last step read. The last output is always the final hidden state, [B, H].
* Activation names (case-insensitive): sigmoid, tanh, relu, linear (identity), scaled_tanh
  (alpha tanh(beta x) with MIL's fixed alpha = beta = 1, so tanh), hard_sigmoid (also spelt
  sigmoid_hard: clamp(alpha x + beta, 0, 1) with the fixed alpha = 0.2, beta = 0.5). MIL gives the
  recurrent ops no way to set alpha or beta.

The gates are matrix products, which Core ML accumulates in float32: float16 programs run these ops
in float32 and are rounded when the outputs are cast back.
"""
from typing import Callable

import torch

from ..registry import register


def _hard_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(0.2 * v + 0.5, 0, 1)


_ACTIVATIONS: dict[str, Callable] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "scaled_tanh": torch.tanh,
    "hard_sigmoid": _hard_sigmoid,
    "sigmoid_hard": _hard_sigmoid,
    "relu": torch.relu,
    "linear": lambda v: v,
}


def _activation(name: str) -> Callable:
    try:
        return _ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"{name!r} is not a MIL recurrent activation (one of {sorted(_ACTIVATIONS)})") from None


def _time_steps(length: int, direction: str) -> range:
    if direction == "forward":
        return range(length)
    if direction == "reverse":
        return range(length - 1, -1, -1)
    raise ValueError(f"direction {direction!r} is not 'forward' or 'reverse'")


def _outputs(states: list[torch.Tensor], output_sequence: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(every state [T, B, H] or the last one [1, B, H], the last one [B, H])."""
    sequence = torch.stack(states) if output_sequence else states[-1].unsqueeze(0)
    return sequence, states[-1]


def _zeros_if_none(values: torch.Tensor | None, size: int, like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(size) if values is None else values


@register("rnn", widen=True)
def rnn(
    x: torch.Tensor,
    initial_h: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias: torch.Tensor | None = None,
    direction: str = "forward",
    output_sequence: bool = False,
    activation: str = "tanh",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elman RNN: h_t = activation(x_t W_ih^T + h_{t-1} W_hh^T + bias).

    weight_ih [H, I], weight_hh [H, H], bias [H] (the input and recurrent biases summed; default 0),
    initial_h [B, H]; direction forward or reverse. Returns (hidden states, final hidden state).
    """
    act = _activation(activation)
    projected = torch.matmul(x, weight_ih.T) + _zeros_if_none(bias, weight_hh.shape[0], x)
    h, states = initial_h, []
    for t in _time_steps(x.shape[0], direction):
        h = act(projected[t] + h @ weight_hh.T)
        states.append(h)
    return _outputs(states, output_sequence)


@register("gru", widen=True)
def gru(
    x: torch.Tensor,
    initial_h: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias: torch.Tensor | None = None,
    direction: str = "forward",
    output_sequence: bool = False,
    recurrent_activation: str = "sigmoid",
    activation: str = "tanh",
    reset_after: bool = False,
    input_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated recurrent unit, gates in the order [reset r, output o, update z] (not PyTorch's r, z, n):

        r_t = recurrent_activation(x_t W_ir^T + b'_r + h_{t-1} W_hr^T + b_r)
        z_t = recurrent_activation(x_t W_iz^T + b'_z + h_{t-1} W_hz^T + b_z)
        o_t = activation(x_t W_io^T + b'_o + (r_t * h_{t-1}) W_ho^T + b_o)        reset_after=False
        o_t = activation(x_t W_io^T + b'_o + r_t * (h_{t-1} W_ho^T + b_o))        reset_after=True
        h_t = (1 - z_t) * o_t + z_t * h_{t-1}

    weight_ih [3H, I], weight_hh [3H, H]; bias b [3H] is the recurrent-side bias and input_bias b'
    [3H] the input-side one (both default 0; iOS 18 adds input_bias and reset_after, whose True
    form is PyTorch's GRU). initial_h [B, H]; direction forward or reverse. Returns (hidden states,
    final hidden state).
    """
    rec_act, act = _activation(recurrent_activation), _activation(activation)
    hidden = weight_hh.shape[1]
    projected = torch.matmul(x, weight_ih.T) + _zeros_if_none(input_bias, 3 * hidden, x)
    bias_r, bias_o, bias_z = _zeros_if_none(bias, 3 * hidden, x).split(hidden)
    w_r, w_o, w_z = weight_hh.split(hidden)
    h, states = initial_h, []
    for t in _time_steps(x.shape[0], direction):
        x_r, x_o, x_z = projected[t].split(hidden, dim=-1)
        r = rec_act(x_r + h @ w_r.T + bias_r)
        z = rec_act(x_z + h @ w_z.T + bias_z)
        recurrent_o = r * (h @ w_o.T + bias_o) if reset_after else (r * h) @ w_o.T + bias_o
        o = act(x_o + recurrent_o)
        h = (1 - z) * o + z * h
        states.append(h)
    return _outputs(states, output_sequence)


@register("lstm", widen=True)
def lstm(
    x: torch.Tensor,
    initial_h: torch.Tensor,
    initial_c: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias: torch.Tensor | None = None,
    peephole: torch.Tensor | None = None,
    weight_ih_back: torch.Tensor | None = None,
    weight_hh_back: torch.Tensor | None = None,
    bias_back: torch.Tensor | None = None,
    peephole_back: torch.Tensor | None = None,
    direction: str = "forward",
    output_sequence: bool = False,
    recurrent_activation: str = "sigmoid",
    cell_activation: str = "tanh",
    activation: str = "tanh",
    clip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Long short-term memory, gates in the order [input i, forget f, output o, cell z] (PyTorch's
    is i, f, z, o):

        i_t = recurrent_activation(x_t W_ii^T + h_{t-1} W_hi^T + b_i + p_i * c_{t-1})
        f_t = recurrent_activation(x_t W_if^T + h_{t-1} W_hf^T + b_f + p_f * c_{t-1})
        z_t = cell_activation(x_t W_iz^T + h_{t-1} W_hz^T + b_z)
        c_t = clip(f_t * c_{t-1} + i_t * z_t)
        o_t = recurrent_activation(x_t W_io^T + h_{t-1} W_ho^T + b_o + p_o * c_t)
        h_t = o_t * activation(c_t)

    weight_ih [4H, I], weight_hh [4H, H], bias [4H] (input and recurrent biases summed; default 0),
    peephole [p_i | p_f | p_o] [3H] (default 0). `clip`, when given, clamps the cell state c_t to
    [-clip, clip] (coremltools' docs say "cell gate"; its op tests' reference clips the state).

    direction forward or reverse: initial_h, initial_c [B, H]. direction bidirectional: a forward
    pass with the weights above and a reverse pass with the `*_back` ones (bias_back and
    peephole_back default 0); states are [B, 2H], forward half first. Unlike a reverse layer's, the
    backward half of a bidirectional output sequence is in input order (output[t] holds both
    directions' states at x[t], as PyTorch's bidirectional LSTM), and without output_sequence the
    output is [forward final | backward final].

    Returns (hidden states, final hidden state, final cell state).
    """
    gates = (_activation(recurrent_activation), _activation(cell_activation), _activation(activation))
    clip_value = None if clip is None else float(clip)
    if direction != "bidirectional":
        parameters = (weight_ih, weight_hh, bias, peephole)
        states, h, c = _lstm_pass(x, initial_h, initial_c, parameters, direction, gates, clip_value)
        return _outputs(states, output_sequence) + (c,)

    hidden = weight_hh.shape[1]
    (h_forward, h_backward), (c_forward, c_backward) = initial_h.split(hidden, -1), initial_c.split(hidden, -1)
    forward = _lstm_pass(x, h_forward, c_forward, (weight_ih, weight_hh, bias, peephole), "forward", gates, clip_value)
    backward_parameters = (weight_ih_back, weight_hh_back, bias_back, peephole_back)
    backward = _lstm_pass(x, h_backward, c_backward, backward_parameters, "reverse", gates, clip_value)
    if output_sequence:
        sequence = torch.cat([torch.stack(forward[0]), torch.stack(backward[0][::-1])], dim=-1)
    else:
        sequence = torch.cat([forward[1], backward[1]], dim=-1).unsqueeze(0)
    return sequence, torch.cat([forward[1], backward[1]], -1), torch.cat([forward[2], backward[2]], -1)


def _lstm_pass(
    x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    parameters: tuple,
    direction: str,
    gates: tuple[Callable, Callable, Callable],
    clip: float | None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One direction of `lstm`: (the hidden states in reading order, final h, final c)."""
    weight_ih, weight_hh, bias, peephole = parameters
    recurrent_act, cell_act, act = gates
    hidden = weight_hh.shape[1]
    projected = torch.matmul(x, weight_ih.T) + _zeros_if_none(bias, 4 * hidden, x)
    peep_i, peep_f, peep_o = _zeros_if_none(peephole, 3 * hidden, x).split(hidden)
    states = []
    for t in _time_steps(x.shape[0], direction):
        pre_i, pre_f, pre_o, pre_z = (projected[t] + h @ weight_hh.T).split(hidden, dim=-1)
        i = recurrent_act(pre_i + peep_i * c)
        f = recurrent_act(pre_f + peep_f * c)
        c = f * c + i * cell_act(pre_z)
        if clip is not None:
            c = torch.clamp(c, -clip, clip)
        h = recurrent_act(pre_o + peep_o * c) * act(c)
        states.append(h)
    return states, h, c
