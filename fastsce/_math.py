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
    "scaled_exp_diff",
    "scaled_exp_diff_rounded",
    "EXP_SCALE_BITS",
    "UNSCALE",
    "bits_to_float64",
    "exp32",
    "exp64",
    "log",
    "log64",
    "float32_to_bits",
    "float64_to_bits",
    "fmaximum",
    "mul_pow2",
    "mul_pow2_from_shifted",
    "prefetch",
    "element_address",
    "store_fence",
    "stream_bfloat16_line",
    "stream_float16_line",
    "stream_line",
    "CACHE_LINE_BYTES",
    "rounded_int_from_shifted",
    "TRANSPOSE_BYTES",
    "TRANSPOSE_MIN_CLASSES",
    "bfloat16_rows_into_tile",
    "float16_rows_into_tile",
    "rows_into_tile",
    "tile_into_bfloat16_rows",
    "tile_into_float16_rows",
    "tile_into_rows",
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
    if value not in _FLOAT_FORMATS or not isinstance(k, types.Integer):
        return None
    int_type, bias, mantissa_bits, _ = _FLOAT_FORMATS[value]

    def codegen(context, builder, signature, args):
        x = args[0]
        n = context.cast(builder, args[1], k, int_type)  # any integer k, in the float's width
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


# Scaled exponentials: ``scaled_exp_diff`` returns ``2**EXP_SCALE_BITS * e**(x - m)``.
# For every k the clamped argument gives (float32 k >= -150, float64 k >= -1076) the
# factor 2**(k + EXP_SCALE_BITS) is a normal number, so it is built from k's bits with
# one shift and applied with one exact multiply. Softmax divides the scale away with the
# sum; sums that are logged are unscaled exactly in float64 (``UNSCALE``).
EXP_SCALE_BITS = 64
UNSCALE = 2.0**-EXP_SCALE_BITS
# float32 constants promote exactly in float64 arithmetic, so they serve both types.
_UNSCALE32 = np.float32(UNSCALE)
_ZERO32 = np.float32(0.0)


@intrinsic
def mul_pow2_from_shifted(typingctx, value, shifted):
    """``value * 2**(k + EXP_SCALE_BITS)`` where ``shifted``'s low bits hold
    ``k + EXP_SCALE_BITS + exponent bias`` (see ``_SCALED_SHIFTER``): the power of two is
    the shifted bits moved into the exponent field, which drops the shifter's own bits.
    NaN in ``value`` stays NaN."""
    if value not in _FLOAT_FORMATS or shifted != value:
        return None
    int_type, _, mantissa_bits, _ = _FLOAT_FORMATS[value]

    def codegen(context, builder, signature, args):
        ll_int = context.get_value_type(int_type)
        power = builder.shl(builder.bitcast(args[1], ll_int), ll_int(mantissa_bits))
        return builder.fmul(args[0], builder.bitcast(power, args[0].type))

    return value(value, shifted), codegen


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


@intrinsic
def prefetch(typingctx, array, index):
    """Hint the cache to fetch the line holding ``array[index]`` (no bounds check needed:
    a prefetch never faults). Kernels prefetch the next row while computing on this one,
    so its read overlaps the arithmetic instead of following it."""
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, value=args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [address.type], ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]))
        builder.call(fn, [address, i32(0), i32(3), i32(1)])  # read, keep in all levels, data
        return context.get_dummy_value()

    return types.none(array, types.intp), codegen


@intrinsic
def element_address(typingctx, array, index):
    """The address of ``array[index]`` as an integer. Unlike ``array.ctypes.data``, it
    takes no reference on the array, whose atomic count the threads contend for when
    every row or class segment asks (see softmax.py's ``store_segment``)."""
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, value=args[0]).data
        return builder.ptrtoint(builder.gep(data, [args[1]]), context.get_value_type(types.intp))

    return types.intp(array, types.intp), codegen


CACHE_LINE_BYTES = 64


def _broadcast(builder, vector, value):
    """A ``vector`` (a type) with the runtime ``value`` in every lane."""
    splat = ir.Constant(vector, ir.Undefined)
    for lane in range(vector.count):
        splat = builder.insert_element(splat, value, ir.IntType(32)(lane))
    return splat


def _stream_store(context, builder, value, dst_type, dst, j):
    """Store the 64-byte vector ``value`` at ``dst[j]`` (64-byte aligned), non-temporally."""
    dst_data = context.make_array(dst_type)(context, builder, value=dst).data
    store = builder.store(value, builder.bitcast(builder.gep(dst_data, [j]), value.type.as_pointer()),
                          align=CACHE_LINE_BYTES)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))


@intrinsic
def stream_line(typingctx, dst, j, src, k, factor):
    """``dst[j : j + n] = src[k : k + n] · factor`` for one 64-byte cache line (``n = 64 //
    itemsize``) with a non-temporal store, which writes around the caches: an output
    bigger than the cache then costs one write to memory instead of a read (to fill the
    line) plus a write. ``dst[j]`` must be 64-byte aligned; see :func:`store_fence`."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.dtype == src.dtype
            and factor == dst.dtype):
        return None

    def codegen(context, builder, signature, args):
        element = context.get_value_type(signature.args[0].dtype)
        size = context.get_abi_sizeof(element)
        vector = ir.VectorType(element, CACHE_LINE_BYTES // size)
        src_data = context.make_array(signature.args[2])(context, builder, value=args[2]).data
        line = builder.load(builder.bitcast(builder.gep(src_data, [args[3]]), vector.as_pointer()), align=size)
        _stream_store(context, builder, builder.fmul(line, _broadcast(builder, vector, args[4])),
                      signature.args[0], args[0], args[1])
        return context.get_dummy_value()

    return types.none(dst, types.intp, src, types.intp, factor), codegen


@intrinsic
def store_fence(typingctx):
    """Order earlier non-temporal stores before any later store (they are weakly ordered)."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


# ------------------------------------------------------------- 16-bit formats ----
# float16 and bfloat16 arrays reach kernels as uint16 bit patterns (Numba has no 16-bit
# float arithmetic); these convert to float32 and back with round-to-nearest-even.


@intrinsic
def float16_bits_to_float32(typingctx, bits):
    """float16 bits → float32, exact (F16C ``vcvtph2ps`` where available)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return _float16_value_ir(builder, args[0])

    return types.float32(types.uint16), codegen


def _same_shape(typ, element):
    """``element``, or a vector of it as long as ``typ`` if that is a vector."""
    return ir.VectorType(element, typ.count) if isinstance(typ, ir.VectorType) else element


def _constant_splat(typ, value):
    """A constant of ``typ`` (a scalar or a vector type) with ``value`` in every lane."""
    return ir.Constant(typ, [value] * typ.count) if isinstance(typ, ir.VectorType) else ir.Constant(typ, value)


def _float16_value_ir(builder, bits):
    """float16 bits (scalar or vector of i16) → float32, exact."""
    half = builder.bitcast(bits, _same_shape(bits.type, ir.HalfType()))
    return builder.fpext(half, _same_shape(bits.type, ir.FloatType()))


def _bfloat16_value_ir(builder, bits):
    """bfloat16 bits (scalar or vector of i16) → float32, exact: the upper half."""
    i32 = _same_shape(bits.type, ir.IntType(32))
    wide = builder.shl(builder.zext(bits, i32), _constant_splat(i32, 16))
    return builder.bitcast(wide, _same_shape(bits.type, ir.FloatType()))


def _float16_bits_ir(builder, value):
    """float32 (scalar or vector) → float16 bits: ``fptrunc``, rounding to nearest even."""
    half = builder.fptrunc(value, _same_shape(value.type, ir.HalfType()))
    return builder.bitcast(half, _same_shape(value.type, ir.IntType(16)))


def _bfloat16_bits_ir(builder, value):
    """float32 (scalar or vector) → bfloat16 bits, rounded to nearest even; NaN stays a
    (quiet) NaN."""
    i32 = _same_shape(value.type, ir.IntType(32))
    bits = builder.bitcast(value, i32)
    high = builder.lshr(bits, _constant_splat(i32, 16))
    lsb = builder.and_(high, _constant_splat(i32, 1))
    rounded = builder.lshr(builder.add(builder.add(bits, _constant_splat(i32, 0x7FFF)), lsb),
                           _constant_splat(i32, 16))
    quiet_nan = builder.or_(high, _constant_splat(i32, 0x40))
    is_nan = builder.fcmp_unordered("uno", value, value)
    return builder.trunc(builder.select(is_nan, quiet_nan, rounded), _same_shape(value.type, ir.IntType(16)))


@intrinsic
def float32_to_float16_bits(typingctx, value):
    """float32 → float16 bits, rounded to nearest even; overflow → inf, NaN stays NaN."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return _float16_bits_ir(builder, args[0])

    return types.uint16(types.float32), codegen


@intrinsic
def bfloat16_bits_to_float32(typingctx, bits):
    """bfloat16 bits → float32, exact (the upper half of a float32)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return _bfloat16_value_ir(builder, args[0])

    return types.float32(types.uint16), codegen


@intrinsic
def float32_to_bfloat16_bits(typingctx, value):
    """float32 → bfloat16 bits, rounded to nearest even; NaN stays a (quiet) NaN."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return _bfloat16_bits_ir(builder, args[0])

    return types.uint16(types.float32), codegen


def _make_stream_encoded_line(encode_ir, name: str):
    """An intrinsic ``name(bits, j, values, k, factor)``: ``bits[j : j + 32] = 16-bit(values[k
    : k + 32] · factor)``, one 64-byte cache line of ``bits`` (``bits[j]`` 64-byte
    aligned) encoded by ``encode_ir`` in registers and stored non-temporally (see
    :func:`stream_line`)."""

    @intrinsic
    def stream_encoded_line(typingctx, bits, j, values, k, factor):
        if not (isinstance(bits, types.Array) and bits.dtype == types.uint16 and isinstance(values, types.Array)
                and values.dtype == types.float32 and factor == types.float32):
            return None

        def codegen(context, builder, signature, args):
            lanes = CACHE_LINE_BYTES // 2
            vector = ir.VectorType(ir.FloatType(), lanes)
            data = context.make_array(signature.args[2])(context, builder, value=args[2]).data
            line = builder.load(builder.bitcast(builder.gep(data, [args[3]]), vector.as_pointer()), align=4)
            encoded = encode_ir(builder, builder.fmul(line, _broadcast(builder, vector, args[4])))
            _stream_store(context, builder, encoded, signature.args[0], args[0], args[1])
            return context.get_dummy_value()

        return types.none(bits, types.intp, values, types.intp, factor), codegen

    stream_encoded_line.__name__ = stream_encoded_line.__qualname__ = name
    return stream_encoded_line


stream_float16_line = _make_stream_encoded_line(_float16_bits_ir, "stream_float16_line")
stream_bfloat16_line = _make_stream_encoded_line(_bfloat16_bits_ir, "stream_bfloat16_line")


# ------------------------------------------------------ in-register transposes ----
# The small-class kernels compute on a (classes, rows) tile of back-to-back rows. A
# scalar transpose moves one element per load and store (0.28 ns per element each way
# here, in cache). These move a group of rows through vector registers: one load per
# row (its classes and the start of the next row, a whole vector), a block transpose of
# shuffles, one store per class; and the same backwards. In cache, 0.09 ns per element
# each way at 10 to 16 classes; below 5 classes a group is mostly padding and loses.
# A row's vector is read and written whole where it lies inside the array: masked loads
# and stores that miss the cache made the transposes of 1048576 x 10 floats 8-9x slower
# here than plain ones. A row written whole spills into the next row, written after it.
TRANSPOSE_BYTES = 64  # a group is one AVX-512 register's lanes: 16 float32 or 8 float64 rows
TRANSPOSE_MIN_CLASSES = 5
_I32 = ir.IntType(32)


def _transpose_ir(builder, vectors: list) -> list:
    """The transpose of a square block (lane ``j`` of vector ``i`` → lane ``i`` of vector
    ``j``): off-diagonal blocks swapped at every scale from half the block down to one
    lane, ``n log2 n`` two-input shuffles for ``n`` vectors."""
    vectors = list(vectors)
    n = len(vectors)
    mask = ir.VectorType(_I32, n)
    half = n // 2
    while half:
        low = ir.Constant(mask, [j if not j & half else n + j - half for j in range(n)])
        high = ir.Constant(mask, [j + half if not j & half else n + j for j in range(n)])
        for i in range(n):
            if not i & half:
                a, b = vectors[i], vectors[i + half]
                vectors[i] = builder.shuffle_vector(a, b, low)
                vectors[i + half] = builder.shuffle_vector(a, b, high)
        half //= 2
    return vectors


def _masked_memory_op(builder, op: str, vector, *args):
    """A call of ``llvm.masked.load``/``llvm.masked.store`` on ``vector`` (a type)."""
    element = vector.element
    lane = "f32" if isinstance(element, ir.FloatType) else "f64" if isinstance(element, ir.DoubleType) else (
        f"i{element.width}")
    suffix = f"v{vector.count}{lane}"
    name = f"llvm.masked.{op}.{suffix}.p0{suffix}"
    fn = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(vector if op == "load" else ir.VoidType(), [a.type for a in args]), name)
    return builder.call(fn, list(args))


class _RowAccess:
    """Vectors of ``lanes`` elements at ``array[start + r · n_cols]``, the first
    ``n_cols`` of which are row ``r``: whole where the vector lies inside the array,
    masked to the row where it would reach past the end."""

    def __init__(self, context, builder, array_type, array, start, n_cols, lanes):
        self.builder = builder
        handle = context.make_array(array_type)(context, builder, value=array)
        self.data, self.size = handle.data, handle.nitems
        self.vector = ir.VectorType(context.get_value_type(array_type.dtype), lanes)
        self.align = context.get_abi_sizeof(self.vector.element)
        self.start, self.n_cols = start, n_cols
        lane_numbers = ir.Constant(ir.VectorType(_I32, lanes), list(range(lanes)))
        bound = _broadcast(builder, ir.VectorType(_I32, lanes), builder.trunc(n_cols, _I32))
        self.row_mask = builder.icmp_unsigned("<", lane_numbers, bound)

    def _at(self, r):
        b = self.builder
        at = b.add(self.start, b.mul(self.n_cols, self.n_cols.type(r)))
        whole = b.icmp_signed("<=", b.add(at, at.type(self.vector.count)), self.size)
        return b.bitcast(b.gep(self.data, [at]), self.vector.as_pointer()), whole

    def load(self, r):
        b = self.builder
        pointer, whole = self._at(r)
        with b.if_else(whole, likely=True) as (plain, masked):
            with plain:
                plain_block = b.block
                plain_value = b.load(pointer, align=self.align)
            with masked:
                masked_block = b.block
                masked_value = _masked_memory_op(b, "load", self.vector, pointer, _I32(self.align), self.row_mask,
                                                 ir.Constant(self.vector, None))
        value = b.phi(self.vector)
        value.add_incoming(plain_value, plain_block)
        value.add_incoming(masked_value, masked_block)
        return value

    def store(self, r, value):
        b = self.builder
        pointer, whole = self._at(r)
        with b.if_else(whole, likely=True) as (plain, masked):
            with plain:
                b.store(value, pointer, align=self.align)
            with masked:
                _masked_memory_op(b, "store", self.vector, value, pointer, _I32(self.align), self.row_mask)


def _class_vector_at(context, builder, tile_type, tile, column, n_rows, c, n_cols, lanes):
    """Pointer to ``tile[c · n_rows + column :][:lanes]``, class ``c`` clamped below
    ``n_cols`` (classes past the last one read the last one's: in bounds, unused)."""
    c = builder.select(builder.icmp_signed(">", n_cols, n_cols.type(c)), n_cols.type(c),
                       builder.sub(n_cols, n_cols.type(1)))
    data = context.make_array(tile_type)(context, builder, value=tile).data
    vector = ir.VectorType(context.get_value_type(tile_type.dtype), lanes)
    return builder.bitcast(builder.gep(data, [builder.add(column, builder.mul(n_rows, c))]), vector.as_pointer())


def _transpose_types(rows, tile, converted: bool) -> bool:
    """Rows of the tile's float dtype, or (``converted``) 16-bit bits for a float32 tile."""
    if not (isinstance(rows, types.Array) and isinstance(tile, types.Array)):
        return False
    if converted:
        return rows.dtype == types.uint16 and tile.dtype == types.float32
    return rows.dtype == tile.dtype and rows.dtype in (types.float32, types.float64)


def _make_rows_into_tile(decode_ir, name: str):
    """An intrinsic ``name(src, start, n_cols, tile, column, n_rows)``: ``tile[c · n_rows +
    column + r] = src[start + r · n_cols + c]`` for the ``g = TRANSPOSE_BYTES //
    tile.itemsize`` rows ``r < g`` and the classes ``c < n_cols <= g``, through registers;
    ``decode_ir`` turns 16-bit bits into float32 (``None``: rows of the tile's dtype)."""

    @intrinsic
    def rows_into_tile(typingctx, src, start, n_cols, tile, column, n_rows):
        if not _transpose_types(src, tile, decode_ir is not None):
            return None

        def codegen(context, builder, signature, args):
            src_, start_, n_cols_, tile_, column_, n_rows_ = args
            element = context.get_value_type(signature.args[3].dtype)
            lanes = TRANSPOSE_BYTES // context.get_abi_sizeof(element)
            rows = _RowAccess(context, builder, signature.args[0], src_, start_, n_cols_, lanes)
            vectors = [rows.load(r) for r in range(lanes)]
            if decode_ir:
                vectors = [decode_ir(builder, v) for v in vectors]
            for c, values in enumerate(_transpose_ir(builder, vectors)):
                pointer = _class_vector_at(context, builder, signature.args[3], tile_, column_, n_rows_, c, n_cols_,
                                           lanes)
                with builder.if_then(builder.icmp_signed(">", n_cols_, n_cols_.type(c)), likely=True):
                    builder.store(values, pointer, align=context.get_abi_sizeof(element))
            return context.get_dummy_value()

        return types.none(src, types.intp, types.intp, tile, types.intp, types.intp), codegen

    rows_into_tile.__name__ = rows_into_tile.__qualname__ = name
    return rows_into_tile


def _make_tile_into_rows(encode_ir, name: str):
    """An intrinsic ``name(tile, column, n_rows, n_cols, dst, start)``, the inverse of
    :func:`_make_rows_into_tile`'s: ``dst[start + r · n_cols + c] = tile[c · n_rows + column
    + r]``, writing the next row's first elements too (with anything) unless that is
    past ``dst``'s end; ``encode_ir`` turns float32 into 16-bit bits (``None``: the
    tile's dtype)."""

    @intrinsic
    def tile_into_rows(typingctx, tile, column, n_rows, n_cols, dst, start):
        if not _transpose_types(dst, tile, encode_ir is not None):
            return None

        def codegen(context, builder, signature, args):
            tile_, column_, n_rows_, n_cols_, dst_, start_ = args
            element = context.get_value_type(signature.args[0].dtype)
            lanes = TRANSPOSE_BYTES // context.get_abi_sizeof(element)
            vectors = [
                builder.load(_class_vector_at(context, builder, signature.args[0], tile_, column_, n_rows_, c, n_cols_,
                                              lanes), align=context.get_abi_sizeof(element))
                for c in range(lanes)
            ]
            rows = _RowAccess(context, builder, signature.args[4], dst_, start_, n_cols_, lanes)
            for r, row in enumerate(_transpose_ir(builder, vectors)):
                rows.store(r, encode_ir(builder, row) if encode_ir else row)
            return context.get_dummy_value()

        return types.none(tile, types.intp, types.intp, types.intp, dst, types.intp), codegen

    tile_into_rows.__name__ = tile_into_rows.__qualname__ = name
    return tile_into_rows


rows_into_tile = _make_rows_into_tile(None, "rows_into_tile")
float16_rows_into_tile = _make_rows_into_tile(_float16_value_ir, "float16_rows_into_tile")
bfloat16_rows_into_tile = _make_rows_into_tile(_bfloat16_value_ir, "bfloat16_rows_into_tile")
tile_into_rows = _make_tile_into_rows(None, "tile_into_rows")
tile_into_float16_rows = _make_tile_into_rows(_float16_bits_ir, "tile_into_float16_rows")
tile_into_bfloat16_rows = _make_tile_into_rows(_bfloat16_bits_ir, "tile_into_bfloat16_rows")


if numba.config.DISABLE_JIT:
    # NUMBA_DISABLE_JIT=1 runs every kernel as plain Python (for coverage and
    # debugging); these NumPy versions stand in for the LLVM intrinsics above.
    _INT_OF = {np.float32: np.int32, np.float64: np.int64}
    _BITS = {np.float32: (127, 23, 0x4B400000, None), np.float64: (1023, 52, 0x4338000000000000, None)}

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

    def mul_pow2_from_shifted(value, shifted):  # noqa: F811
        float_type = _float_of(value)
        int_type = _INT_OF[float_type]
        _, mantissa_bits, _, _ = _BITS[float_type]
        bits = np.array(shifted, float_type).view(int_type)
        power = np.left_shift(bits, mantissa_bits, dtype=int_type).view(float_type)[()]
        with np.errstate(invalid="ignore", over="ignore"):
            return float_type(value * power)

    def fmaximum(a, b):  # noqa: F811
        return np.maximum(a, b)

    def prefetch(array, index):  # noqa: F811
        pass

    def element_address(array, index):  # noqa: F811
        return array.ctypes.data + index * array.itemsize

    def stream_line(dst, j, src, k, factor):  # noqa: F811
        n = CACHE_LINE_BYTES // dst.itemsize
        dst[j : j + n] = src[k : k + n] * factor

    def stream_float16_line(bits, j, values, k, factor):  # noqa: F811
        for i in range(CACHE_LINE_BYTES // 2):
            bits[j + i] = float32_to_float16_bits(np.float32(values[k + i] * factor))

    def stream_bfloat16_line(bits, j, values, k, factor):  # noqa: F811
        for i in range(CACHE_LINE_BYTES // 2):
            bits[j + i] = float32_to_bfloat16_bits(np.float32(values[k + i] * factor))

    def store_fence():  # noqa: F811
        pass

    # The 16-bit casts run once per element: NumPy scalar views, not a 0-d array per call.
    def float16_bits_to_float32(bits):  # noqa: F811
        return np.float32(np.uint16(bits).view(np.float16))

    def float32_to_float16_bits(value):  # noqa: F811
        return np.float16(np.float32(value)).view(np.uint16)  # the cast rounds to nearest even

    def bfloat16_bits_to_float32(bits):  # noqa: F811
        return np.uint32(int(bits) << 16).view(np.float32)

    def float32_to_bfloat16_bits(value):  # noqa: F811
        bits = int(np.float32(value).view(np.uint32))
        if math.isnan(value):
            return np.uint16((bits >> 16) | 0x40)
        return np.uint16(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF)

    def _rows_into_tile_py(convert):
        def rows_into_tile(src, start, n_cols, tile, column, n_rows):
            for r in range(TRANSPOSE_BYTES // tile.itemsize):
                for c in range(n_cols):
                    tile[c * n_rows + column + r] = convert(src[start + r * n_cols + c])

        return rows_into_tile

    def _tile_into_rows_py(convert):
        def tile_into_rows(tile, column, n_rows, n_cols, dst, start):
            for r in range(TRANSPOSE_BYTES // tile.itemsize):
                for c in range(n_cols):
                    dst[start + r * n_cols + c] = convert(tile[c * n_rows + column + r])

        return tile_into_rows

    rows_into_tile = _rows_into_tile_py(lambda v: v)  # noqa: F811
    float16_rows_into_tile = _rows_into_tile_py(float16_bits_to_float32)  # noqa: F811
    bfloat16_rows_into_tile = _rows_into_tile_py(bfloat16_bits_to_float32)  # noqa: F811
    tile_into_rows = _tile_into_rows_py(lambda v: v)  # noqa: F811
    tile_into_float16_rows = _tile_into_rows_py(float32_to_float16_bits)  # noqa: F811
    tile_into_bfloat16_rows = _tile_into_rows_py(float32_to_bfloat16_bits)  # noqa: F811


# float32 constants. Clamping keeps k within [-150, 128], where both halves of 2^k
# are normal numbers; the clamped x still gives exactly 0 or inf.
_F32_HI = np.float32(89.0)
_F32_LO = np.float32(-104.0)
_F32_LOG2E = np.float32(1.44269504088896341)
_F32_LN2_HI = np.float32(0.693359375)  # few mantissa bits: k*LN2_HI is exact
_F32_LN2_LO = np.float32(-2.12194440e-4)
_F32_SHIFTER = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer
# e^r = 1 + r + r^2 * Q(r) on |r| <= ln2/2, Q of degree 4 fitted for relative error
# (6e-9 before rounding, well below float32's 6e-8; one degree less than Cephes' expf).
_F32_Q0 = np.float32(0.49999988)
_F32_Q1 = np.float32(0.16666518)
_F32_Q2 = np.float32(0.041669529)
_F32_Q3 = np.float32(0.0083689224)
_F32_Q4 = np.float32(0.0013751423)
_F32_ONE = np.float32(1.0)


# float64 constants: k within [-1076, 1025] after clamping, both halves normal.
_F64_HI = 710.0
_F64_LO = -746.0
_F64_LOG2E = 1.4426950408889634
_F64_LN2_HI = 6.93147180369123816490e-01  # fdlibm split: k*LN2_HI exact for |k|<2^11
_F64_LN2_LO = 1.90821492927058770002e-10
_F64_SHIFTER = 6755399441055744.0  # 1.5 * 2**52
# e^r = 1 + r + r^2 * Q(r), Q of degree 9: the Chebyshev interpolant of (e^r - 1 - r)/r^2
# on |r| <= ln2/2 (mpmath.chebyfit), relative error 1.6e-17 with these rounded
# coefficients, 0.14 of a half-ulp. Taylor's 1/n! needed degree 13 for 5e-18: two FMAs
# more per element, in loops that are compute-bound in float64.
_F64_Q = (
    0.5000000000000001,
    0.16666666666666669,
    0.04166666666662413,
    0.008333333333330062,
    0.0013888888917213717,
    0.00019841269863053618,
    2.4801521295954376e-05,
    2.7557268459997064e-06,
    2.7620088445409746e-07,
    2.510038549551032e-08,
)
_F64_C2, _F64_C3, _F64_C4, _F64_C5, _F64_C6, _F64_C7, _F64_C8, _F64_C9, _F64_C10, _F64_C11 = _F64_Q

# Shifters whose low bits come out as k + EXP_SCALE_BITS + exponent bias: the integer
# part of ``d*log2(e) + shifter`` is then ready for ``mul_pow2_from_shifted``.
_F32_SCALED_SHIFTER = np.float32(12582912.0 + EXP_SCALE_BITS + 127)
_F64_SCALED_SHIFTER = 6755399441055744.0 + EXP_SCALE_BITS + 1023


@numba.njit(fastmath=_EXP_FLAGS, **JIT_OPTIONS)
def _exp32_poly(x: np.float32, tail: np.float32, shifter: np.float32) -> tuple[np.float32, np.float32]:
    """``(p, shifted)``: ``e**(x + tail) = p * 2**k`` with ``k = shifted - shifter`` (an
    integer), for ``x`` in [-104, 89] or NaN and ``|tail| <= ulp(x)``."""
    shifted = x * _F32_LOG2E + shifter
    kf = shifted - shifter  # round(x / ln2), exact (no `reassoc` to fold it)
    r = (x - kf * _F32_LN2_HI) + (tail - kf * _F32_LN2_LO)
    q = _F32_Q4
    q = q * r + _F32_Q3
    q = q * r + _F32_Q2
    q = q * r + _F32_Q1
    q = q * r + _F32_Q0
    return q * (r * r) + r + _F32_ONE, shifted


@numba.njit(fastmath=_EXP_FLAGS, **JIT_OPTIONS)
def _exp64_poly(x: float, tail: float, shifter: float) -> tuple[float, float]:
    """``(p, shifted)`` as :func:`_exp32_poly`, for ``x`` in [-746, 710] or NaN."""
    shifted = x * _F64_LOG2E + shifter
    kf = shifted - shifter
    r = (x - kf * _F64_LN2_HI) + (tail - kf * _F64_LN2_LO)
    p = _F64_C11
    p = p * r + _F64_C10
    p = p * r + _F64_C9
    p = p * r + _F64_C8
    p = p * r + _F64_C7
    p = p * r + _F64_C6
    p = p * r + _F64_C5
    p = p * r + _F64_C4
    p = p * r + _F64_C3
    p = p * r + _F64_C2
    return p * (r * r) + r + 1.0, shifted


# Clamps are written `LO if x < LO else x` so that NaN passes through them.
@numba.njit(fastmath=_EXP_FLAGS, **JIT_OPTIONS)
def exp32(x: np.float32) -> np.float32:
    """``e**x`` for float32, within 1 ulp over the whole range, NaN/inf preserving."""
    x = _F32_HI if x > _F32_HI else x
    x = _F32_LO if x < _F32_LO else x
    p, shifted = _exp32_poly(x, np.float32(0.0), _F32_SHIFTER)
    return mul_pow2(p, rounded_int_from_shifted(shifted))


@numba.njit(fastmath=_EXP_FLAGS, **JIT_OPTIONS)
def exp64(x: float) -> float:
    """``e**x`` for float64, within 1 ulp over the whole range, NaN/inf preserving."""
    x = _F64_HI if x > _F64_HI else x
    x = _F64_LO if x < _F64_LO else x
    p, shifted = _exp64_poly(x, 0.0, _F64_SHIFTER)
    return mul_pow2(p, rounded_int_from_shifted(shifted))


@numba.njit(fastmath=_EXP_FLAGS, **JIT_OPTIONS)
def _difference_with_error(x, m):
    """``(d, e)`` with ``d = fl(x - m)`` and ``d + e == x - m`` exactly (Knuth's TwoSum).

    Compiled without `reassoc`, which would cancel ``e`` to zero.
    """
    d = x - m
    back = d - x
    return d, (x - (d - back)) + (-m - back)


def _exp_parts(d, tail):
    """``(p, shifted)`` of :func:`_exp32_poly`/:func:`_exp64_poly` with the scaled shifter,
    after clamping ``d <= 0`` at the underflow limit (``tail`` dropped there, since it can
    be as large as ``d``'s rounding error); NaN passes through. Resolves at compile time
    like :func:`exp`."""
    if isinstance(d, np.float32):
        underflows = d < _F32_LO
        return _exp32_poly(_F32_LO if underflows else d, np.float32(0.0) if underflows else tail,
                           _F32_SCALED_SHIFTER)
    underflows = d < _F64_LO
    return _exp64_poly(_F64_LO if underflows else d, 0.0 if underflows else tail, _F64_SCALED_SHIFTER)


@overload(_exp_parts, jit_options={"fastmath": _EXP_FLAGS, **JIT_OPTIONS})
def _exp_parts_overload(d, tail):
    if d == types.float32:

        def parts32(d, tail):
            underflows = d < _F32_LO  # False for NaN
            return _exp32_poly(_F32_LO if underflows else d, np.float32(0.0) if underflows else tail,
                               _F32_SCALED_SHIFTER)

        return parts32
    if d == types.float64:

        def parts64(d, tail):
            underflows = d < _F64_LO
            return _exp64_poly(_F64_LO if underflows else d, 0.0 if underflows else tail, _F64_SCALED_SHIFTER)

        return parts64
    return None


@numba.njit(fastmath=_EXP_FLAGS, **JIT_OPTIONS)
def scaled_exp_diff(x, m):
    """``2**EXP_SCALE_BITS * e**(x - m)`` for ``x <= m`` (``m`` a row maximum), float32 or
    float64, within 1 ulp.

    ``x - m`` is taken exactly: its rounding error is carried into the reduced
    argument, which keeps small results (large ``m - x``) accurate to the last bit. A
    difference below the clamp (``x = -inf``, any finite ``x`` below ``m = +inf``, any
    ``x`` far below a huge ``m``) gives the scaled ``e**clamp``, which unscaling or a
    softmax normalization (a sum ``>= 2**EXP_SCALE_BITS``) rounds to exactly 0; NaN in
    ``x`` or ``m`` and ``x = m = ±inf`` give NaN. Thanks to the scale, results down to
    the smallest subnormal are rounded once, by that final division or ``UNSCALE``.
    """
    d, tail = _difference_with_error(x, m)
    p, shifted = _exp_parts(d, tail)
    return mul_pow2_from_shifted(p, shifted)


@numba.njit(fastmath=_EXP_FLAGS, **JIT_OPTIONS)
def scaled_exp_diff_rounded(x, m):
    """:func:`scaled_exp_diff` with ``x - m`` rounded, for terms of a sum.

    A term's relative error grows to ``|x - m|·u`` (``u`` the unit roundoff), but the
    terms that carry a sum have small ``|x - m|``: the sum's relative error from this
    stays below ``max(|d|·e**d)·u < 0.4·u``. Saves the six additions of the exact
    difference.
    """
    p, shifted = _exp_parts(x - m, _ZERO32)
    return mul_pow2_from_shifted(p, shifted)


@numba.njit(fastmath=_EXP_FLAGS, **JIT_OPTIONS)
def exp_diff(x, m):
    """``e**(x - m)`` for ``x <= m``, unscaled, within 1 ulp; see :func:`scaled_exp_diff`.

    Results in the subnormal range are rounded once, by the unscaling multiply.
    """
    return scaled_exp_diff(x, m) * _UNSCALE32


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


# ------------------------------------------------------------------------- log ----
# fdlibm's log (e_log.c): x = 2^k·(1 + f) with 1 + f in [sqrt(2)/2, sqrt(2)), then
# log(1 + f) = f - (hfsq - s·(hfsq + R(s²))) with s = f/(2 + f), hfsq = f²/2. Written
# without branches so that per-row logs (the small-class kernels take one per row) run
# as vector code; libm's scalar log would cost as much as the row's exps.
_F64_LG1 = 6.666666666666735130e-01
_F64_LG2 = 3.999999999940941908e-01
_F64_LG3 = 2.857142874366239149e-01
_F64_LG4 = 2.222219843214978396e-01
_F64_LG5 = 1.818357216161805012e-01
_F64_LG6 = 1.531383769920937332e-01
_F64_LG7 = 1.479819860511658591e-01
_F64_SMALLEST_NORMAL = 2.0**-1022
_F64_TWO54 = 2.0**54
_LOG_OFFSET = np.int64(0x3FF0000000000000 - 0x3FE6A09E00000000)  # moves sqrt(2)/2 to 1.0
_LOG_MANTISSA = np.int64(0x000FFFFFFFFFFFFF)
_LOG_SQRT_HALF_BITS = np.int64(0x3FE6A09E00000000)
_INT_TO_F64_MAGIC = np.int64(0x4338000000000000)  # bits of 1.5·2^52: int + these = float


@numba.njit(fastmath=_EXP_FLAGS, **JIT_OPTIONS)
def log64(x: float) -> float:
    """Natural log of a float64, within 1 ulp; ``log(0) = -inf``, ``log(+inf) = +inf``,
    NaN for negative ``x`` and NaN. Branch-free (vectorizes)."""
    subnormal = x < _F64_SMALLEST_NORMAL
    bits = float64_to_bits(x * _F64_TWO54 if subnormal else x) + _LOG_OFFSET
    k = (bits >> 52) - (1023 + 54 if subnormal else 1023)
    f = bits_to_float64((bits & _LOG_MANTISSA) + _LOG_SQRT_HALF_BITS) - 1.0
    # k as a float without an int64 conversion (AVX2 has none): |k| < 2^51
    dk = bits_to_float64(k + _INT_TO_F64_MAGIC) - _F64_SHIFTER
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (_F64_LG2 + w * (_F64_LG4 + w * _F64_LG6))
    t2 = z * (_F64_LG1 + w * (_F64_LG3 + w * (_F64_LG5 + w * _F64_LG7)))
    hfsq = 0.5 * f * f
    result = dk * _F64_LN2_HI - ((hfsq - (s * (hfsq + t1 + t2) + dk * _F64_LN2_LO)) - f)
    result = -np.inf if x == 0.0 else result
    result = np.nan if x < 0.0 else result
    return result if x < np.inf else x  # +inf and NaN are their own log


def log(x):
    """``log(x)`` in float64 (:func:`log64`); resolves at compile time inside kernels."""
    return log64(np.float64(x))


@overload(log, jit_options=JIT_OPTIONS)
def _log_overload(x):
    if isinstance(x, types.Float):
        return lambda x: log64(np.float64(x))
    return None
