"""Vectorizable ``exp`` for float32 and float64, and the bit casts it needs.

Numba's ``math.exp`` lowers to a scalar libm call when llvmlite has no SVML (the
PyPI build), which stops LLVM from vectorizing any loop that contains it. The
functions here are plain arithmetic, so a loop that calls them compiles to packed
AVX2/AVX-512 instructions.

Method (Cody-Waite): ``x = k*ln2 + r`` with ``|r| <= ln2/2``; ``e^r`` by a polynomial;
``2^k`` assembled in the exponent bits. ``2^k`` is applied as two factors
``2^(k//2) * 2^(k - k//2)`` so that every ``k`` in the clamped range is
representable: results round once into the subnormal range, underflow to ``+0``
and overflow to ``+inf`` exactly as a correctly rounded ``exp`` would.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from ._config import BFLOAT16, FLOAT16, JIT_OPTIONS  # noqa: F401  (re-exported)

# Only `contract` (FMA): `reassoc` could fold the round-to-integer trick away.
_EXP_FLAGS = {"contract"}

__all__ = [
    "BFLOAT16",
    "FLOAT16",
    "bfloat16_bits_to_float32",
    "bits_to_float32",
    "float16_bits_to_float32",
    "float32_to_bfloat16_bits",
    "float32_to_float16_bits",
    "exp",
    "exp_diff",
    "exp_diff32",
    "exp_diff64",
    "bits_to_float64",
    "exp32",
    "exp64",
    "float32_to_bits",
    "float64_to_bits",
    "fmaximum",
    "mul_pow2",
    "mul_pow2_nonpositive",
    "rounded_int_from_shifted",
]


def _make_bitcast(src: types.Type, dst: types.Type, name: str):
    @intrinsic
    def bitcast(typingctx, value):
        if value != src:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(dst))

        return dst(src), codegen

    bitcast.__name__ = name
    bitcast.__qualname__ = name
    return bitcast


float32_to_bits = _make_bitcast(types.float32, types.int32, "float32_to_bits")
bits_to_float32 = _make_bitcast(types.int32, types.float32, "bits_to_float32")
float64_to_bits = _make_bitcast(types.float64, types.int64, "float64_to_bits")
bits_to_float64 = _make_bitcast(types.int64, types.float64, "bits_to_float64")

# The integer half of exp, written in LLVM IR: Numba would widen int32 arithmetic to
# int64, and AVX2 has no vector int64 conversions, which scalarizes the whole loop.
# (float type, same-width int type, exponent bias, mantissa bits, bits of 1.5 * 2**mantissa)
_FLOAT_FORMATS = {
    types.float32: (types.int32, 127, 23, 0x4B400000),
    types.float64: (types.int64, 1023, 52, 0x4338000000000000),
}


@intrinsic
def rounded_int_from_shifted(typingctx, shifted):
    """``k`` from ``shifted = y + 1.5 * 2**mantissa_bits``: the nearest integer to ``y``,
    read from the low bits (same-width int). Defined for every input, NaN included."""
    if shifted not in _FLOAT_FORMATS:
        return None
    int_type, _, _, shifter_bits = _FLOAT_FORMATS[shifted]

    def codegen(context, builder, signature, args):
        ll_int = context.get_value_type(int_type)
        bits = builder.bitcast(args[0], ll_int)
        return builder.sub(bits, ll_int(shifter_bits))

    return int_type(shifted), codegen


@intrinsic
def mul_pow2(typingctx, value, k):
    """``value * 2**k`` as two exact power-of-two factors ``2**(k//2) * 2**(k - k//2)``, so
    that ``k`` may span both the subnormal and the overflow range (one final rounding)."""
    if value not in _FLOAT_FORMATS or k != _FLOAT_FORMATS[value][0]:
        return None
    _, bias, mantissa_bits, _ = _FLOAT_FORMATS[value]

    def codegen(context, builder, signature, args):
        x, n = args
        ll_int = n.type
        ll_float = context.get_value_type(value)
        half = builder.ashr(n, ll_int(1))
        rest = builder.sub(n, half)
        factors = [
            builder.bitcast(builder.shl(builder.add(e, ll_int(bias)), ll_int(mantissa_bits)), ll_float)
            for e in (half, rest)
        ]
        return builder.fmul(builder.fmul(x, factors[0]), factors[1])

    return value(value, k), codegen


# Bias for mul_pow2_nonpositive: 2**(k + bias) is normal for every k the clamped
# exp_diff can produce (f32: [-150, 0]; f64: [-1076, 0]).
_NONPOSITIVE_BIAS = {types.float32: 64, types.float64: 512}


@intrinsic
def mul_pow2_nonpositive(typingctx, value, k):
    """``value * 2**k`` for ``k <= 0``: ``value * 2**(k + B)`` (exact) ``* 2**-B``, which
    rounds once into the subnormal range. Two integer ops instead of mul_pow2's ten."""
    if value not in _FLOAT_FORMATS or k != _FLOAT_FORMATS[value][0]:
        return None
    _, exponent_bias, mantissa_bits, _ = _FLOAT_FORMATS[value]
    bias = _NONPOSITIVE_BIAS[value]

    def codegen(context, builder, signature, args):
        x, n = args
        ll_int = n.type
        ll_float = context.get_value_type(value)
        biased = builder.shl(builder.add(n, ll_int(bias + exponent_bias)), ll_int(mantissa_bits))
        unbias = ll_float(float(2.0 ** -bias))
        return builder.fmul(builder.fmul(x, builder.bitcast(biased, ll_float)), unbias)

    return value(value, k), codegen


@intrinsic
def fmaximum(typingctx, a, b):
    """NaN-propagating max (``llvm.maximum``). LLVM vectorizes a reduction written with
    it; ``v if v > m else m`` is only vectorized under `nnan`, which we never set."""
    if a != b or not isinstance(a, types.Float):
        return None

    def codegen(context, builder, signature, args):
        ll_float = context.get_value_type(a)
        fn = builder.module.declare_intrinsic("llvm.maximum", [ll_float], ir.FunctionType(ll_float, [ll_float] * 2))
        return builder.call(fn, args)

    return a(a, b), codegen


# ------------------------------------------------------------- 16-bit formats ----
# float16 and bfloat16 arrays reach kernels as uint16 bit patterns (Numba has no 16-bit
# float arithmetic); these convert to float32 and back with round-to-nearest-even.


@intrinsic
def float16_bits_to_float32(typingctx, bits):
    """float16 bits → float32, exact (F16C ``vcvtph2ps`` where available)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        half = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def float32_to_float16_bits(typingctx, value):
    """float32 → float16 bits, rounded to nearest even; overflow → inf, NaN stays NaN."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(half, ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def bfloat16_bits_to_float32(typingctx, bits):
    """bfloat16 bits → float32, exact (the upper half of a float32)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.IntType(32)(16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def float32_to_bfloat16_bits(typingctx, value):
    """float32 → bfloat16 bits, rounded to nearest even; NaN stays a (quiet) NaN."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        lsb = builder.and_(builder.lshr(bits, i32(16)), i32(1))
        rounded = builder.lshr(builder.add(builder.add(bits, i32(0x7FFF)), lsb), i32(16))
        quiet_nan = builder.or_(builder.lshr(bits, i32(16)), i32(0x40))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(is_nan, quiet_nan, rounded), ir.IntType(16))

    return types.uint16(types.float32), codegen


if numba.config.DISABLE_JIT:
    # NUMBA_DISABLE_JIT=1 runs every kernel as plain Python (for coverage and
    # debugging); these NumPy versions stand in for the LLVM intrinsics above.
    _INT_OF = {np.float32: np.int32, np.float64: np.int64}
    _BITS = {np.float32: (127, 23, 0x4B400000, 64), np.float64: (1023, 52, 0x4338000000000000, 512)}

    def _float_of(value):
        return np.float32 if isinstance(value, np.float32) else np.float64

    def _pow2(float_type, n):
        bias, mantissa_bits, _, _ = _BITS[float_type]
        return np.array((int(n) + bias) << mantissa_bits, _INT_OF[float_type]).view(float_type)[()]

    def float32_to_bits(value):  # noqa: F811
        return np.array(value, np.float32).view(np.int32)[()]

    def bits_to_float32(bits):  # noqa: F811
        return np.array(bits, np.int32).view(np.float32)[()]

    def float64_to_bits(value):  # noqa: F811
        return np.array(value, np.float64).view(np.int64)[()]

    def bits_to_float64(bits):  # noqa: F811
        return np.array(bits, np.int64).view(np.float64)[()]

    def rounded_int_from_shifted(shifted):  # noqa: F811
        float_type = _float_of(shifted)
        bits = int(np.array(shifted, float_type).view(_INT_OF[float_type])[()])
        return bits - _BITS[float_type][2]

    def mul_pow2(value, k):  # noqa: F811
        float_type = _float_of(value)
        if not math.isfinite(value):
            return value
        half = int(k) >> 1
        return float_type(float_type(value * _pow2(float_type, half)) * _pow2(float_type, int(k) - half))

    def mul_pow2_nonpositive(value, k):  # noqa: F811
        float_type = _float_of(value)
        if not math.isfinite(value):
            return value
        bias = _BITS[float_type][3]
        return float_type(float_type(value * _pow2(float_type, int(k) + bias)) * float_type(2.0**-bias))

    def fmaximum(a, b):  # noqa: F811
        return np.maximum(a, b)

    def float16_bits_to_float32(bits):  # noqa: F811
        return np.float32(np.array(bits, np.uint16).view(np.float16)[()])

    def float32_to_float16_bits(value):  # noqa: F811
        return np.array(np.float32(value).astype(np.float16)).view(np.uint16)[()]

    def bfloat16_bits_to_float32(bits):  # noqa: F811
        return np.array(int(bits) << 16, np.uint32).view(np.float32)[()]

    def float32_to_bfloat16_bits(value):  # noqa: F811
        bits = int(np.array(value, np.float32).view(np.uint32)[()])
        if math.isnan(value):
            return np.uint16((bits >> 16) | 0x40)
        return np.uint16(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF)


# float32 constants. Clamping keeps k within [-150, 128], where both halves of 2^k
# are normal numbers; the clamped x still gives exactly 0 or inf.
_F32_HI = np.float32(89.0)
_F32_LO = np.float32(-104.0)
_F32_LOG2E = np.float32(1.44269504088896341)
_F32_LN2_HI = np.float32(0.693359375)  # few mantissa bits: k*LN2_HI is exact
_F32_LN2_LO = np.float32(-2.12194440e-4)
_F32_SHIFTER = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer
# Cephes expf minimax coefficients for e^r = 1 + r + r^2 * P(r), |r| <= ln2/2.
_F32_P0 = np.float32(1.9875691500e-4)
_F32_P1 = np.float32(1.3981999507e-3)
_F32_P2 = np.float32(8.3334519073e-3)
_F32_P3 = np.float32(4.1665795894e-2)
_F32_P4 = np.float32(1.6666665459e-1)
_F32_P5 = np.float32(5.0000001201e-1)
_F32_ONE = np.float32(1.0)


# float64 constants: k within [-1076, 1025] after clamping, both halves normal.
_F64_HI = 710.0
_F64_LO = -746.0
_F64_LOG2E = 1.4426950408889634
_F64_LN2_HI = 6.93147180369123816490e-01  # fdlibm split: k*LN2_HI exact for |k|<2^11
_F64_LN2_LO = 1.90821492927058770002e-10
_F64_SHIFTER = 6755399441055744.0  # 1.5 * 2**52
# Taylor coefficients 1/n! for n = 2..13: truncation error < 5e-18 on |r| <= ln2/2.
(_F64_C2, _F64_C3, _F64_C4, _F64_C5, _F64_C6, _F64_C7,
 _F64_C8, _F64_C9, _F64_C10, _F64_C11, _F64_C12, _F64_C13) = (1.0 / math.factorial(n) for n in range(2, 14))


@numba.njit(fastmath=_EXP_FLAGS, **JIT_OPTIONS)
def _exp32_reduced(x: np.float32, tail: np.float32) -> tuple[np.float32, np.int32]:
    """``(p, k)`` with ``e**(x + tail) = p * 2**k``, ``x`` in [-104, 89] or NaN and
    ``|tail| <= ulp(x)``."""
    shifted = x * _F32_LOG2E + _F32_SHIFTER
    kf = shifted - _F32_SHIFTER  # round(x / ln2), exact (no `reassoc` to fold it)
    r = x - kf * _F32_LN2_HI
    r = (r - kf * _F32_LN2_LO) + tail
    p = _F32_P0
    p = p * r + _F32_P1
    p = p * r + _F32_P2
    p = p * r + _F32_P3
    p = p * r + _F32_P4
    p = p * r + _F32_P5
    p = p * (r * r) + r + _F32_ONE
    return p, rounded_int_from_shifted(shifted)


@numba.njit(fastmath=_EXP_FLAGS, **JIT_OPTIONS)
def _exp64_reduced(x: float, tail: float) -> tuple[float, int]:
    """``(p, k)`` with ``e**(x + tail) = p * 2**k``, ``x`` in [-746, 710] or NaN and
    ``|tail| <= ulp(x)``."""
    shifted = x * _F64_LOG2E + _F64_SHIFTER
    kf = shifted - _F64_SHIFTER
    r = x - kf * _F64_LN2_HI
    r = (r - kf * _F64_LN2_LO) + tail
    p = _F64_C13
    p = p * r + _F64_C12
    p = p * r + _F64_C11
    p = p * r + _F64_C10
    p = p * r + _F64_C9
    p = p * r + _F64_C8
    p = p * r + _F64_C7
    p = p * r + _F64_C6
    p = p * r + _F64_C5
    p = p * r + _F64_C4
    p = p * r + _F64_C3
    p = p * r + _F64_C2
    p = p * (r * r) + r + 1.0
    return p, rounded_int_from_shifted(shifted)


# Clamps are written `LO if x < LO else x` so that NaN passes through them.
@numba.njit(fastmath=_EXP_FLAGS, **JIT_OPTIONS)
def exp32(x: np.float32) -> np.float32:
    """``e**x`` for float32, within 1 ulp over the whole range, NaN/inf preserving."""
    x = _F32_HI if x > _F32_HI else x
    x = _F32_LO if x < _F32_LO else x
    p, k = _exp32_reduced(x, np.float32(0.0))
    return mul_pow2(p, k)


@numba.njit(fastmath=_EXP_FLAGS, **JIT_OPTIONS)
def exp64(x: float) -> float:
    """``e**x`` for float64, within 1 ulp over the whole range, NaN/inf preserving."""
    x = _F64_HI if x > _F64_HI else x
    x = _F64_LO if x < _F64_LO else x
    p, k = _exp64_reduced(x, 0.0)
    return mul_pow2(p, k)


@numba.njit(fastmath=_EXP_FLAGS, **JIT_OPTIONS)
def _difference_with_error(x, m):
    """``(d, e)`` with ``d = fl(x - m)`` and ``d + e == x - m`` exactly (Knuth's TwoSum).

    Compiled without `reassoc`, which would cancel ``e`` to zero.
    """
    d = x - m
    back = d - x
    return d, (x - (d - back)) + (-m - back)


@numba.njit(fastmath=_EXP_FLAGS, **JIT_OPTIONS)
def exp_diff32(x: np.float32, m: np.float32) -> np.float32:
    """``e**(x - m)`` for float32 and ``x <= m`` (``m`` a row maximum).

    ``x - m`` is taken exactly: its rounding error is carried into the reduced
    argument, so the result stays within ~1 ulp even for large ``m - x``. A
    difference below -104 (``x = -inf``, any finite ``x`` below ``m = +inf``, any ``x``
    far below a huge ``m``) gives 0; NaN in ``x`` or ``m`` and ``x = m = ±inf`` give NaN.
    """
    d, tail = _difference_with_error(x, m)
    underflows = d < _F32_LO  # False for NaN, which passes through
    d = _F32_LO if underflows else d
    tail = np.float32(0.0) if underflows else tail
    p, k = _exp32_reduced(d, tail)
    return mul_pow2_nonpositive(p, k)


@numba.njit(fastmath=_EXP_FLAGS, **JIT_OPTIONS)
def exp_diff64(x: float, m: float) -> float:
    """``e**(x - m)`` for float64 and ``x <= m``; see :func:`exp_diff32`."""
    d, tail = _difference_with_error(x, m)
    underflows = d < _F64_LO
    d = _F64_LO if underflows else d
    tail = 0.0 if underflows else tail
    p, k = _exp64_reduced(d, tail)
    return mul_pow2_nonpositive(p, k)

def exp(x):
    """``e**x`` in the precision of ``x``: :func:`exp32` or :func:`exp64`.

    Inside kernels this resolves at compile time (see the overload below); the Python
    body only runs with ``NUMBA_DISABLE_JIT=1``.
    """
    return exp32(x) if isinstance(x, np.float32) else exp64(x)


@overload(exp, jit_options=JIT_OPTIONS)
def _exp_overload(x):
    if x == types.float32:
        return lambda x: exp32(x)
    if x == types.float64:
        return lambda x: exp64(x)
    return None


def exp_diff(x, m):
    """``e**(x - m)`` in the precision of ``x``, ``x - m`` taken exactly (see
    :func:`exp_diff32`). Resolves at compile time like :func:`exp`."""
    return exp_diff32(x, m) if isinstance(x, np.float32) else exp_diff64(x, m)


@overload(exp_diff, jit_options=JIT_OPTIONS)
def _exp_diff_overload(x, m):
    if x == types.float32:
        return lambda x, m: exp_diff32(x, m)
    if x == types.float64:
        return lambda x, m: exp_diff64(x, m)
    return None
