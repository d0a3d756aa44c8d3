"""Reading a package's weight file without mapping it: coremltools' reader maps the whole file and copies each
weight out of the mapping, so loading SD's Unet briefly held its 1.6 GiB of weights twice (the copies, and the
mapped file's pages until the reader was dropped). This reader reads each float weight with one pread into the
array that keeps it, leaving the file in the page cache, not in the process."""
import os
import struct
from contextlib import contextmanager

import numpy as np
from coremltools.converters.mil.frontend.milproto import load as milproto_load

BLOB_SENTINEL = 0xDEADBEEF
METADATA = struct.Struct("<IIQQ")  # sentinel, MIL data type, size in bytes, offset of the data
_ORIGINAL_READER = milproto_load.BlobReader


class ReadingBlobReader:
    """coremltools' BlobReader interface: float16 and float32 weights (the bulk of a model) read with pread, the
    packed integer types (palette indices, small) through coremltools' own reader."""

    def __init__(self, path: str):
        self.path = path
        self._packed_reader = None

    def read_fp16_data(self, offset: int) -> np.ndarray:
        return self._read(offset, np.uint16)

    def read_float_data(self, offset: int) -> np.ndarray:
        return self._read(offset, np.float32)

    def _read(self, offset: int, dtype: type) -> np.ndarray:
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            sentinel, _, size, data_offset = METADATA.unpack(os.pread(descriptor, METADATA.size, offset))
            if sentinel != BLOB_SENTINEL:
                raise ValueError(f"{self.path}: no weight at offset {offset}")
            values = np.empty(size // np.dtype(dtype).itemsize, dtype)
            view = memoryview(values).cast("B")
            done = 0
            while done < size:
                read = os.preadv(descriptor, [view[done:]], data_offset + done)
                if read == 0:
                    raise ValueError(f"{self.path}: the weight at offset {offset} runs past the end of the file")
                done += read
            return values
        finally:
            os.close(descriptor)

    def __getattr__(self, name: str):
        if self._packed_reader is None:
            self._packed_reader = _ORIGINAL_READER(self.path)
        return getattr(self._packed_reader, name)



@contextmanager
def reading_weights():
    """coremltools' MIL loader reads weight files with `ReadingBlobReader` inside this block."""
    milproto_load.BlobReader = ReadingBlobReader
    try:
        yield
    finally:
        milproto_load.BlobReader = _ORIGINAL_READER
