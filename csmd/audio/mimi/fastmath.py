"""exp-based activations built only from MLX ops that are fast on x86 CPUs.

MLX's x86 wheels build their CPU kernels for baseline x86-64: `mx.exp`, `mx.erf`, `mx.where`, `mx.floor` and
the softmax run scalar code that calls libm (`fmaf`, `floorf`) per element, many times slower than a
multiply (BENCHMARKS.md, "Figures moved out of the code"), and Mimi's decoder runs ~550 k ELUs per frame. Adds,
multiplies, min/max, float<->int casts and shifts vectorize, and `mx.compile` fuses a chain of them into
one loop, so these versions cost about as much as a copy.

Accuracy: `exp_nonpositive` is within 1e-7 relative of the true exp on [-87, 0] (Taylor remainder < 6e-9
plus float32 rounding); below -87 it returns ~1.6e-38 instead of something smaller, which is 0 next to
anything it is added to. `erf` is within 6e-7 absolute (the formula's 1.5e-7 plus
float32 rounding).
"""

from __future__ import annotations

import math

import mlx.core as mx

_LOG2E = 1.0 / math.log(2.0)
# ln 2 split in two (Cody & Waite) so that n * _LN2_HI is exact in float32 for |n| <= 126.
_LN2_HI = 0.693145751953125
_LN2_LO = math.log(2.0) - _LN2_HI
# Taylor coefficients of exp(r) = sum r^k / k!, highest first; |r| <= ln(2)/2, so degree 7 leaves < 6e-9.
_EXP_TAYLOR = [1.0 / math.factorial(k) for k in range(7, -1, -1)]
# Abramowitz & Stegun 7.1.26: erf(x) = 1 - t (a1 + t (a2 + ...)) exp(-x^2), t = 1 / (1 + p x), x >= 0.
_ERF_P = 0.3275911
_ERF_A = [1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592]


def _polynomial(x: mx.array, coefficients: list[float]) -> mx.array:
    """Horner's rule, coefficients highest degree first (at least two)."""
    y = x * coefficients[0] + coefficients[1]
    for c in coefficients[2:]:
        y = y * x + c
    return y


def exp_nonpositive(z: mx.array) -> mx.array:
    """exp(z) for z <= 0 (float32): exp(z) = 2^n exp(r) with n an integer and |r| <= ln(2)/2."""
    z = mx.maximum(z, -87.0)  # 2^n must stay a normal float: n >= -126
    # n = round(z / ln2); z <= 0, so float->int truncation (toward zero) of y - 0.5 rounds to nearest.
    n = (z * _LOG2E - 0.5).astype(mx.int32)
    n_float = n.astype(mx.float32)
    r = (z - n_float * _LN2_HI) - n_float * _LN2_LO
    two_to_n = mx.left_shift(n + 127, 23).view(mx.float32)  # the float32 whose exponent field is n
    return two_to_n * _polynomial(r, _EXP_TAYLOR)


def elu(x: mx.array) -> mx.array:
    """ELU with alpha 1: x for x > 0, exp(x) - 1 otherwise (exactly x when x > 0, as exp(0) is exactly 1)."""
    return mx.maximum(x, 0.0) + (exp_nonpositive(mx.minimum(x, 0.0)) - 1.0)


def erf(x: mx.array) -> mx.array:
    magnitude = mx.abs(x)
    t = 1.0 / (1.0 + _ERF_P * magnitude)
    tail = t * _polynomial(t, _ERF_A) * exp_nonpositive(-magnitude * magnitude)
    sign = mx.minimum(mx.maximum(x * 1e30, -1.0), 1.0)  # the sign of x without mx.sign / mx.where; 0 -> 0
    return sign * (1.0 - tail)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as Mimi was trained: x * (1 + erf(x / sqrt 2)) / 2."""
    return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))


def softmax(scores: mx.array, axis: int = -1) -> mx.array:
    """Softmax whose exponent is always <= 0 after subtracting the max; masked scores must be finite."""
    e = exp_nonpositive(scores - scores.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)
