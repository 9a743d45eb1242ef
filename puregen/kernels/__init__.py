"""Update steps of the purifiers and the noise contract.

`philox` is the single definition of every random number (counter layout,
key, uniform and normal transforms). Each fused step (Langevin update, DDPM
forward noising, DDPM reverse step, noise drawn inside the kernel) has one
interface and three implementations:

* `reference`: plain torch, fp32, the oracle;
* `native`: C++ with OpenMP from `csrc/` (C ABI, loaded with ctypes), for CPU;
* `triton_kernels`: Triton, for CUDA (tested on CPU under ``TRITON_INTERPRET=1``).

`dispatch` picks one per device; `group_norm_silu` is the UNet's fused
GroupNorm + SiLU as a `torch.library` custom op (Triton on CUDA).
"""
