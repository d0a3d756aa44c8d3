"""The op implementations, one module per MIL op family; importing this package fills the op table."""
from . import (  # noqa: F401
    activation,
    classify,
    constexpr,
    conv,
    elementwise,
    image_resizing,
    linear,
    normalization,
    pool,
    quantization,
    random,
    recurrent,
    reduction,
    scatter_gather,
    tensor_operation,
    tensor_transformation,
)
