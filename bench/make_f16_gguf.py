#!/usr/bin/env python3
"""Writes an f16 GGUF of a quantized GGUF (same metadata, every 2-D tensor dequantized to f16 by the
`gguf` package, 1-D tensors kept f32) so llama.cpp can be timed on the same f16 weights wick runs.

Usage: python3 bench/make_f16_gguf.py IN.gguf OUT.gguf
"""
import sys

import gguf
import numpy as np
from gguf.quants import dequantize


def main(src, dst):
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vt = field.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(name, field.contents())
        elif name == "general.file_type":
            w.add_uint32(name, int(gguf.LlamaFileType.MOSTLY_F16))
        else:
            w.add_key_value(name, field.contents(), vt)
    for t in r.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        data = data.astype(np.float16) if data.ndim == 2 else data
        w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
