"""What the compiled extension was built with and what it runs with."""

import json

import torch

from ._version import __version__


def build_info() -> dict:
    """Describe the build of the ``sparsemom_ext`` extension.

    Returns a dict with:

    - ``version``: the sparsemom_ext version;
    - ``torch_version``: the torch the extension was compiled against, and
      ``torch_version_runtime``: the torch imported now (they should match);
    - ``cuda``: whether CUDA kernels are compiled in; ``cuda_version``: the CUDA
      runtime they were compiled with (``"13.0"``, or ``None``); ``cuda_archs``: the
      GPU code in the binary (``["sm_80", "sm_90"]``; ``compute_XX`` means PTX that
      newer GPUs compile at load time);
    - ``cuda_kernels_registered``: whether the dispatcher holds CUDA kernels for the
      ops (what a GPU run will use);
    - ``cpu_isa``: the CPU vector ISA the kernels use now (``avx512``, ``avx2`` or
      ``default``), ``cpu_isa_detected``: the best one this CPU supports (the
      environment variable ``SPARSEMOM_CPU_ISA`` can cap the first);
    - ``openmp``: whether CPU kernels run multi-threaded; ``num_threads``: torch's
      current intra-op thread count; ``compiler``: the C++ compiler used.
    """

    info = json.loads(torch.ops.sparsemom.build_info())
    cuda_version = info.pop("cuda_version")
    return {
        "version": __version__,
        "torch_version": info["torch_version"],
        "torch_version_runtime": torch.__version__,
        "cuda": cuda_version > 0,
        "cuda_version": f"{cuda_version // 1000}.{cuda_version % 1000 // 10}" if cuda_version else None,
        "cuda_archs": [a for a in info["cuda_archs"].split(",") if a],
        "cuda_kernels_registered": torch._C._dispatch_has_kernel_for_dispatch_key(
            "sparsemom::mask_apply_", "CUDA"
        ),
        "cpu_isa": info["cpu_isa"],
        "cpu_isa_detected": info["cpu_isa_detected"],
        "openmp": info["openmp"],
        "num_threads": torch.get_num_threads(),
        "compiler": info["compiler"],
    }
