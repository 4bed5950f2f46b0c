"""Command line: ``python -m fastsce bench`` and ``python -m fastsce info``."""

from __future__ import annotations

import sys

USAGE = """usage: python -m fastsce {bench,info} [options]

  bench   time fastsce against np.copyto (the memory limit), NumPy, torch and JAX
          (python -m fastsce bench --help for options)
  info    versions, threading layer, threads, cache directory and the CPU's SIMD level
"""


def simd_level() -> str:
    """The widest vector instruction set LLVM will target on this CPU."""
    import llvmlite.binding as llvm

    features = {name for name, enabled in llvm.get_host_cpu_features().items() if enabled}
    for level, needed in (("AVX-512", "avx512f"), ("AVX2+FMA", "avx2"), ("AVX", "avx"), ("SSE4.2", "sse4.2"),
                          ("NEON", "neon")):
        if needed in features:
            return level
    return "scalar"


def info() -> int:
    import llvmlite
    import llvmlite.binding as llvm
    import numba
    import numpy as np

    import fastsce
    from fastsce._config import cache_dir, threading_layer

    fastsce.softmax(np.zeros((2, 2), np.float32))  # starts the threading layer
    rows = [
        ("fastsce", fastsce.__version__),
        ("numba", numba.__version__),
        ("llvmlite", llvmlite.__version__),
        ("numpy", np.__version__),
        ("python", sys.version.split()[0]),
        ("threading layer", threading_layer()),
        ("threads", f"{fastsce.get_num_threads()} of {numba.config.NUMBA_NUM_THREADS}"),
        ("cache directory", cache_dir()),
        ("cpu", llvm.get_host_cpu_name()),
        ("simd", simd_level()),
    ]
    for optional in ("torch", "jax"):
        try:
            module = __import__(optional)
            rows.append((optional, module.__version__))
        except ImportError:
            rows.append((optional, "not installed"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        return info()
    if command == "bench":
        from fastsce._bench import main as bench

        return bench(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
