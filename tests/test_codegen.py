"""The hot loops must compile to packed vector code (design.md §4-5).

Numba will not show the assembly of kernels loaded from its on-disk cache, so the
kernels are compiled afresh in a subprocess with an empty ``NUMBA_CACHE_DIR``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import needs_jit

pytestmark = needs_jit("inspects the machine code of compiled kernels")

# (module, function): the loops that touch every element.
HOT_LOOPS = [
    ("rowio", "copy_max"),
    ("softmax", "exp_inplace"),
    ("softmax", "row_sum_exp"),
    ("softmax", "pair_sum_exp"),
    ("softmax", "pair_exp_inplace"),
    ("rowio", "copy_scaled"),
    ("rowio", "stream_scaled"),
    ("rowio", "stream_encoded"),
    ("softmax", "columns_max"),
    ("softmax", "columns_exp_inplace"),
    ("softmax", "columns_sum_exp"),
    ("softmax", "columns_lse"),
    ("softmax", "copy_max_tile"),
    ("softmax", "columns_scale_into"),
    ("softmax", "columns_log_softmax_into"),
    ("rowio", "transpose_into"),
    ("rowio", "transpose_from"),
]

SCRIPT = textwrap.dedent(
    """
    import json, math, re
    import numba
    import numpy as np
    import fastsce
    from fastsce._kernels import rowio, softmax

    rng = np.random.default_rng(0)
    fastsce.softmax(rng.standard_normal((64, 1000), dtype=np.float32))
    fastsce.log_softmax(rng.standard_normal((64, 1000), dtype=np.float32))
    small = rng.standard_normal((4096, 10), dtype=np.float32)
    fastsce.softmax(small), fastsce.log_softmax(small), fastsce.logsumexp(small)
    fastsce.cross_entropy_with_grad(rng.standard_normal((64, 1000), dtype=np.float32), np.zeros(64, np.int64))
    paired = rng.standard_normal((64, 128), dtype=np.float32)  # rows in pairs
    fastsce.softmax(paired.astype(np.float16))  # a 16-bit output: exps of rounded differences
    fastsce.logsumexp(paired), fastsce.cross_entropy_with_grad(paired, np.zeros(64, np.int64))
    big = rng.standard_normal((1280, 4096), dtype=np.float32)  # streamed: 20 MB of 16 KB rows
    fastsce.softmax(big, out=big)
    fastsce.softmax(np.zeros((2048, 4096), np.float16))  # streamed 16-bit bits: 16 MB of 8 KB rows
    columns = rng.standard_normal((1024, 4096), dtype=np.float32)  # axis=0, streamed: 16 MB
    fastsce.softmax(columns, axis=0), fastsce.log_softmax(columns, axis=0)
    @numba.njit
    def control(a):  # libm's scalar exp and log: what the patterns below must catch
        for i in range(a.size):
            a[i] = math.exp(math.log(a[i]))

    control(np.ones(4))
    HOT_LOOPS.append(("control", "control"))
    packed = re.compile(r"\\bv(fmadd|fnmadd|fmsub|fnmsub)\\d+ps\\s.*%[yz]mm")
    report = {}
    for module, name in HOT_LOOPS:
        dispatcher = control if module == "control" else getattr({"rowio": rowio, "softmax": softmax}[module], name)
        float32_sigs = [s for s in dispatcher.signatures if "float32" in str(s[0])] or dispatcher.signatures
        counts = []
        for sig in float32_sigs:  # every variant (e.g. exact and rounded differences) must pass
            asm = dispatcher.inspect_asm(sig)
            counts.append({
                "packed_fma": len(packed.findall(asm)),
                "packed_max": len(re.findall(r"\\bvmaxps\\s.*%[yz]mm", asm)),
                "packed_any": len(re.findall(r"\\bv\\w+ps\\s.*%[yz]mm", asm)),
                # a libm call loads the symbol's address (`movabsq $exp, %r`) or calls it via the PLT
                "libm_exp": len(re.findall(r"[$\\s](expf?|__expf?_finite)(@|\\b)", asm)),
                "libm_log": len(re.findall(r"[$\\s](logf?|__logf?_finite)(@|\\b)", asm)),
                "packed_div": len(re.findall(r"\\bvdivpd\\s.*%[yz]mm", asm)),
                "nontemporal": len(re.findall(r"\\bvmovnt(p[sd]|dq)\\s", asm)),
                "packed_to_half": len(re.findall(r"\\bvcvtps2phx?\\s.*%[yz]mm", asm)),
                "prefetch": len(re.findall(r"\\bprefetcht0\\s", asm)),
                "packed_shuffle": len(re.findall(r"\\bv(perm[it]2p[sd]|shuf[f\\w]*|unpck\\w+|permp[sd]|insertf\\w+)\\s.*%[yz]mm", asm)),
            })
        report[name] = {key: (max if key.startswith("libm") else min)(c[key] for c in counts) for key in counts[0]}
        report[name]["variants"] = len(counts)
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def codegen(tmp_path_factory):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path_factory.mktemp("numba-cache")))
    env.pop("NUMBA_DISABLE_JIT", None)
    script = f"HOT_LOOPS = {HOT_LOOPS!r}\n" + SCRIPT
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "name", ["exp_inplace", "row_sum_exp", "pair_sum_exp", "pair_exp_inplace", "columns_exp_inplace", "columns_sum_exp"]
)
def test_exp_loops_are_vectorized(codegen, name):
    """The exp polynomial runs as packed FMAs on ymm/zmm registers, never via libm."""
    assert codegen[name]["packed_fma"] >= 6, codegen[name]
    assert codegen[name]["libm_exp"] == 0, codegen[name]


def test_both_exp_variants_were_inspected(codegen):
    """float32 and 16-bit outputs compile the exact- and rounded-difference loops; the
    counts above are the minimum over both. (pair_exp_inplace's rounded variant is the
    same loop twice; compiling it here would cost a 16-bit cross-entropy kernel.)"""
    assert codegen["exp_inplace"]["variants"] >= 2, codegen["exp_inplace"]


def test_libm_calls_are_detected(codegen):
    """The patterns that rule out libm calls do find them in a loop that makes them."""
    assert codegen["control"]["libm_exp"] >= 1 and codegen["control"]["libm_log"] >= 1, codegen["control"]


def test_max_reduction_is_vectorized(codegen):
    assert codegen["copy_max"]["packed_max"] >= 1, codegen["copy_max"]


def test_column_max_is_vectorized(codegen):
    """np.maximum's NaN-propagating max: packed compares and blends rather than vmaxps."""
    assert codegen["columns_max"]["packed_any"] >= 2, codegen["columns_max"]


def test_per_row_logs_are_vectorized(codegen):
    """Small-class rows take one log each: packed (log's division on ymm), never libm's."""
    assert codegen["columns_lse"]["packed_div"] >= 1, codegen["columns_lse"]
    assert codegen["columns_lse"]["libm_log"] == 0, codegen["columns_lse"]


@pytest.mark.parametrize("name", ["copy_scaled", "stream_scaled"])
def test_scaling_is_vectorized(codegen, name):
    assert codegen[name]["packed_any"] >= 1, codegen[name]


def test_streamed_rows_use_nontemporal_stores(codegen):
    """Big outputs are written around the caches, a cache line per store pair."""
    assert codegen["stream_scaled"]["nontemporal"] >= 1, codegen["stream_scaled"]


def test_streamed_16_bit_rows_are_encoded_in_registers(codegen):
    """16-bit outputs too: a cache line of bits converted with packed instructions (F16C's
    vcvtps2ph for float16) and stored non-temporally."""
    assert codegen["stream_encoded"]["nontemporal"] >= 1, codegen["stream_encoded"]
    assert codegen["stream_encoded"]["packed_to_half"] >= 1, codegen["stream_encoded"]


def test_column_copy_max_is_vectorized(codegen):
    """The one read of an axis=0 tile copies it to scratch and max-reduces it in one
    packed loop."""
    assert codegen["copy_max_tile"]["packed_max"] >= 1, codegen["copy_max_tile"]


@pytest.mark.parametrize("name", ["columns_scale_into", "columns_log_softmax_into"])
def test_column_tiles_are_written_packed_and_streamed(codegen, name):
    assert codegen[name]["packed_any"] >= 1, codegen[name]
    assert codegen[name]["nontemporal"] >= 1, codegen[name]


@pytest.mark.parametrize("name", ["exp_inplace", "row_sum_exp"])
def test_exp_loops_prefetch_the_next_row(codegen, name):
    assert codegen[name]["prefetch"] >= 1, codegen[name]


@pytest.mark.parametrize("name", ["transpose_into", "transpose_from"])
def test_small_class_transposes_run_in_registers(codegen, name):
    """A group of 16 float32 rows is transposed by a network of 64 two-input shuffles
    (design.md §5: several rows per vector step), not element by element."""
    assert codegen[name]["packed_shuffle"] >= 32, codegen[name]
