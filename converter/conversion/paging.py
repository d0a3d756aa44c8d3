"""Running a float32 reference model without holding all its weights: diffusers and transformers map float32
safetensors weights from their file rather than copying them, so after each layer runs, its weights' pages can be
handed back and read again from the file if needed. Validation of SDXL's Unet then holds a layer of its 10 GB of
float32 weights at a time, not all of them."""
import torch

from coreml_sd.runtime.memory import file_backed_ranges, file_backed_spans, page_out


def page_out_after_use(module: torch.nn.Module) -> list:
    """Forward hooks on each layer of `module` that own file-mapped weights, handing their pages back after the
    layer runs; the hooks' handles (they go with the module). Weights copied into memory (another dtype, a merged
    LoRA, a built-in model) are left as they are."""
    mapped = file_backed_ranges()
    handles = []
    for layer in module.modules():
        tensors = [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]
        spans = file_backed_spans([(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                                   for t in tensors if t.numel()], mapped)
        if spans:
            handles.append(layer.register_forward_hook(lambda *_, spans=spans: page_out(spans)))
    return handles
