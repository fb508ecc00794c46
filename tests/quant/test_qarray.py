"""Packed weights: int4 and dense 1-4 bit packing round trips; QArray equals fake quantization; bits per param."""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp as jc
from jaxcomp.quant.dot import fake_quant_weight
from jaxcomp.quant.qarray import (QArray, canonical, from_canonical, pack_bits, pack_codes,
                                  pack_int4, unpack_codes,
                                  quantize_weight, quantize_with_step, unpack_bits, unpack_int4,
                                  values_per_unit)

int4_arrays = hnp.arrays(
    np.int8, st.tuples(st.integers(1, 8).map(lambda n: 2 * n), st.integers(1, 5)),
    elements=st.integers(-8, 7))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(q=int4_arrays, axis=st.sampled_from([0, -2]))
def test_pack_unpack_roundtrip(q, axis):
  # one jitted program per example (eagerly, every op compiles per shape)
  packed, unpacked = jax.jit(lambda q: (p := pack_int4(q, axis), unpack_int4(p, axis)))(
      jnp.asarray(q))
  assert packed.dtype == jnp.int8 and packed.shape[0] == q.shape[0] // 2
  np.testing.assert_array_equal(np.asarray(unpacked), q)
  # The layout's contract: the byte read as int8 is 16 * odd + even + 8 (what the packed
  # W4A8 decode multiplies directly), and its low nibble is even + 8.
  q = q.astype(np.int32)
  np.testing.assert_array_equal(np.asarray(packed, np.int32), 16 * q[1::2] + q[0::2] + 8)
  np.testing.assert_array_equal(np.asarray(packed) & 15, q[0::2] + 8)


def test_unpack_int4_refuses_other_byte_types():
  with pytest.raises(TypeError, match="int8 .*got uint8"):
    unpack_int4(jnp.zeros((2, 2), jnp.uint8))


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(codes=hnp.arrays(np.uint8, st.tuples(st.integers(1, 3), st.integers(1, 4).map(
    lambda n: 2 * n)), elements=st.integers(0, 15)))
def test_pack_codes_roundtrip(codes):
  packed, unpacked = jax.jit(lambda c: (p := pack_codes(c, 1), unpack_codes(p, 1)))(
      jnp.asarray(codes))
  assert packed.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(packed), codes[:, 0::2] | (codes[:, 1::2] << 4))
  np.testing.assert_array_equal(np.asarray(unpacked), codes)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(data=st.data(), bits=st.integers(1, 4), axis=st.sampled_from([0, 1, -1]))
def test_pack_bits_roundtrip_and_size(data, bits, axis):
  per = values_per_unit(bits)
  shape = [data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))]
  shape[axis] *= per
  lo = -(1 << (bits - 1))
  q = data.draw(hnp.arrays(np.int8, tuple(shape), elements=st.integers(lo, -lo - 1)))
  # one jitted program per example (eagerly, every op compiles per shape)
  packed, unpacked = jax.jit(
      lambda q: (p := pack_bits(q, bits, axis), unpack_bits(p, bits, axis)))(jnp.asarray(q))
  assert packed.dtype == (jnp.int8 if bits == 4 else jnp.uint8)  # 4 bits: pack_int4's bytes
  assert packed.shape[axis] == shape[axis] * bits // 8
  np.testing.assert_array_equal(np.asarray(unpacked), q)


def test_pack_bits_layout_and_errors():
  # 3 bits: eight values in three bytes, value i at bits 3i..3i+2 of the little-endian stream.
  q = jnp.array([1, 2, 3, -4, -3, -2, -1, 0], jnp.int8)
  word = sum((int(v) & 7) << (3 * i) for i, v in enumerate(q))
  assert pack_bits(q, 3).tolist() == [word & 255, (word >> 8) & 255, word >> 16]
  with pytest.raises(ValueError, match="length 6, not a multiple of 8"):
    pack_bits(jnp.zeros((6,), jnp.int8), 3)
  with pytest.raises(ValueError, match="1 to 4 bits"):
    pack_bits(jnp.zeros((8,), jnp.int8), 5)


@pytest.mark.parametrize("bits,group,k,packed_bytes", [
    (2, 64, 256, 256 * 2 // 8), (3, 128, 256, 256 * 3 // 8), (4, 128, 256, 256 // 2),
    (3, 4, 36, 36),  # K not a multiple of 8: 3-bit values stay one a byte
])
def test_low_bit_qarrays_store_their_bits(bits, group, k, packed_bytes):
  w = jax.random.normal(jax.random.key(1), (k, 16))
  spec = jc.Quant(w_bits=bits, group=group)
  qa = quantize_weight(w, (0,), spec)
  assert qa.values.shape == (16, packed_bytes)
  assert qa.nbytes == 16 * packed_bytes + 4 * qa.scale.size
  np.testing.assert_array_equal(np.asarray(qa.dequantize()),
                                np.asarray(fake_quant_weight(w, (0,), spec)))
  if qa.packed:
    np.testing.assert_array_equal(np.asarray(unpack_int4(qa.nibbles(), 1)), np.asarray(qa.ints()))


def test_pack_rejects_odd_axis():
  with pytest.raises(ValueError, match="odd length 3"):
    pack_int4(jnp.zeros((3, 2), jnp.int8))


@pytest.mark.parametrize("shape,contracting,spec", [
    ((64, 32), (0,), jc.Quant(w_bits=8)),
    ((64, 32), (0,), jc.Quant(w_bits=4, group=16)),
    ((64, 32), (0,), jc.Quant(w_bits=4, w_symmetric=False)),
    ((64, 32), (0,), jc.Quant(w_bits=3, group=32)),
    ((64, 32), (0,), jc.Quant(w_bits=4, calibration="percentile", percentile=99.0)),
    ((3, 3, 8, 16), (0, 1, 2), jc.Quant(w_bits=4, group=4)),
    ((50, 16), (1,), jc.Quant(w_bits=4)),  # an embedding table, rows are channels
    ((64, 32), (0,), jc.Quant(w_bits=4, group=16, full_range=True)),
    ((4, 16, 32), (0, 1), jc.Quant(w_bits=4, group=32)),  # groups spanning two axes
    ((3, 3, 4, 8), (0, 1, 2), jc.Quant(w_bits=4, group=8)),  # 36 taps, a shorter last group
], ids=str)
def test_dequantize_equals_fake_quant(shape, contracting, spec):
  w = jax.random.normal(jax.random.key(0), shape)
  qa = quantize_weight(w, contracting, spec)
  np.testing.assert_array_equal(np.asarray(qa.dequantize()),
                                np.asarray(fake_quant_weight(w, contracting, spec)))
  assert qa.packed == (spec.w_bits <= 4)
  assert qa.dequantize().shape == shape
  assert qa.ints().shape == canonical(w, contracting).shape


def test_quantize_with_step_equals_fake_quant_with_that_step():
  w = jax.random.normal(jax.random.key(3), (64, 48))
  spec = jc.Quant(w_bits=4, group=16, learn_scale=True)
  step = jnp.abs(jax.random.normal(jax.random.key(4), (4, 48))) * 0.1 + 0.05
  qa = quantize_with_step(w, (0,), step, 4, group=16)
  np.testing.assert_array_equal(np.asarray(qa.dequantize()),
                                np.asarray(fake_quant_weight(w, (0,), spec, step)))


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(shape=st.sampled_from([(8, 6), (2, 3, 4), (3, 3, 2, 5)]), data=st.data())
def test_canonical_roundtrip(shape, data):
  nd = len(shape)
  contracting = tuple(sorted(data.draw(st.sets(st.integers(0, nd - 1), min_size=1,
                                               max_size=nd - 1))))
  w = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  m = canonical(w, contracting)
  assert m.shape[1] == np.prod([shape[a] for a in contracting])
  np.testing.assert_array_equal(from_canonical(m, shape, contracting), w)


def test_bits_per_param():
  w = jax.random.normal(jax.random.key(1), (1024, 256))
  g128 = quantize_weight(w, (0,), jc.Quant(w_bits=4, group=128))
  int8 = quantize_weight(w, (0,), jc.Quant(w_bits=8))
  assert 8 * g128.nbytes / w.size == pytest.approx(4.25)
  assert 8 * int8.nbytes / w.size == pytest.approx(8 + 32 / 1024)


def test_qarray_is_a_pytree_under_jit():
  w = jax.random.normal(jax.random.key(2), (32, 8))
  qa = quantize_weight(w, (0,), jc.Quant(w_bits=4))
  leaves = jax.tree.leaves(qa)
  assert len(leaves) == 2  # values, scale (symmetric: no zero point)
  out = jax.jit(lambda q: q.dequantize())(qa)
  np.testing.assert_array_equal(out, qa.dequantize())
  assert isinstance(jax.tree.map(lambda x: x, qa), QArray)


@pytest.mark.parametrize("spec", [jc.Quant(w_bits=4, group=24), jc.Quant(w_bits=8, group=24),
                                  jc.Quant(w_bits=4, group=24, w_symmetric=False)], ids=str)
def test_shorter_last_group_packs_exactly(spec):
  w = jax.random.normal(jax.random.key(5), (64, 16))  # K = 64: groups 24, 24, 16
  qa = quantize_weight(w, (0,), spec)
  assert qa.scale.shape == (16, 3) and qa.group == 24
  np.testing.assert_array_equal(np.asarray(qa.dequantize()),
                                np.asarray(fake_quant_weight(w, (0,), spec)))
