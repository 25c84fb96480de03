#!/bin/bash
# Source this to build wick's `cuda` feature on a machine without a GPU (or without a CUDA install):
#   source scripts/cuda-toolchain.sh [PREFIX]        (default PREFIX: ~/.cache/cuda13)
# Installs CUDA 13.0's nvcc, headers, cuBLAS, cuRAND and NVRTC from the Python package index into
# PREFIX (about 1.2 GB, once), makes a link-time stand-in for the driver library libcuda.so (the
# real one comes with the NVIDIA driver on the GPU machine), and exports CUDA_ROOT, PATH,
# CUDA_COMPUTE_CAP (default 90: H100/H200), LIBRARY_PATH and RUSTFLAGS for `cargo build --features cuda`.
# Keep nvcc at 13.0: a driver for CUDA 13.0 (r580) refuses PTX from a newer nvcc.
_wick_cuda_setup() {
  local p=${1:-$HOME/.cache/cuda13}
  if [ ! -x "$p/nvidia/cu13/bin/nvcc" ]; then
    python3 -m pip install -q --target "$p" \
      "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
      "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-nvrtc==13.0.88" "nvidia-cuda-cccl==13.0.85" \
      "nvidia-cublas==13.1.0.3" "nvidia-curand==10.4.5.25" || return 1
  fi
  local l=$p/link
  mkdir -p "$l"
  if [ ! -f "$l/libcuda.so" ]; then
    # cudarc links -lcuda. Every driver-API symbol it declares gets a stub returning an error; the
    # soname is the real library's, so at run time the loader picks the driver's libcuda.so.1.
    local c
    c=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -1 || true)
    if [ -z "$c" ]; then cargo fetch -q >/dev/null 2>&1; c=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.* | tail -1); fi
    grep -hoE "^\s+fn cu[A-Za-z0-9_]+\(" "$c/src/driver/sys/mod.rs" | sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
      | awk '{print "int " $1 "(void){return 999;}"}' > "$l/cuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$l/libcuda.so" "$l/cuda_stub.c" || return 1
    for f in cublas cublasLt cudart nvrtc; do ln -sf "$p/nvidia/cu13/lib/lib$f.so.13" "$l/lib$f.so"; done
    ln -sf "$p/nvidia/cu13/lib/libcurand.so.10" "$l/libcurand.so"
  fi
  export CUDA_ROOT=$p/nvidia/cu13 PATH=$p/nvidia/cu13/bin:$PATH CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
  case ":${LIBRARY_PATH:-}:" in *":$l:"*) ;; *) export LIBRARY_PATH=$l${LIBRARY_PATH:+:$LIBRARY_PATH} ;; esac
  case " ${RUSTFLAGS:-} " in *" -L $l "*) ;; *) export RUSTFLAGS="${RUSTFLAGS:-} -L $l" ;; esac
  nvcc --version | tail -1
}
_wick_cuda_setup "$@"
