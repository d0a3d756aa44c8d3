"""The op implementations, one module per MIL op family; importing this package fills the op table."""
from . import (  # noqa: F401
    activation,
    constexpr,
    conv,
    elementwise,
    image_resizing,
    linear,
    lists,
    normalization,
    pool,
    quantization,
    recurrent,
    reduction,
    scatter_gather,
    state,
    tensor_operation,
    tensor_transformation,
)
