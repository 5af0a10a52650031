"""Export: the physically slimmed network (pruned channels removed from every tensor) with integer weights.

Slimming. `slim_spec` rewrites an architecture spec to the kept channel counts, and `slice_variables` cuts the
masked model's variables down to the kept channels, so `Net(slim_spec(...))` computes without masks what the
masked model computes. Chains need no special care as long as their members share one mask (export_model
checks it): the channels they keep coincide, and option-A shortcuts still append zeros at the end (the kept
channels of a narrower stage are the first kept channels of the wider one).

Export. `export_model(path, spec, variables, masks, bits)` writes the compressed model to ONE uncompressed
`.npz` file (written to a temporary file beside `path`, then `os.replace`d, so a failed export never leaves a
half-written file), and `load_model(path)` rebuilds the slim Flax model from it:

    report = export_model('model.npz', spec, variables, masks, bits)          # sizes, see `size_report`
    module, variables, bits = load_model('model.npz')
    logits = module.apply(variables, x, bits=bits)                             # no masks

File format (version 1). Arrays of the npz, for each prunable conv L of the spec, in forward order:

    'L/codes'   uint8   the integer weight codes of the SLIM kernel (k, k, c_in_kept / groups, c_out_kept),
                        C order, each code stored in exactly `weight_bits` bits, most significant bit first,
                        codes back to back (np.packbits order), the last byte zero-padded; so the array has
                        ceil(numel * bits / 8) bytes. A code c of a k-bit layer (2 <= k < 32) lies in
                        [-n, n], n = 2^(k-1) - 1, and is stored as the unsigned offset c + n (k bits hold
                        0 .. 2^k - 2); a 1-bit code is -1 or +1, stored as 0 or 1. Unpacked, the codes are
                        int8 (k <= 8), int16 (k <= 16) or int32. Present when weight_bits < 32.
    'L/kernel'  float32 the slim kernel itself, for a 32-bit layer (instead of 'L/codes').
    'L/bn'      float32 (4, c_out_kept): BatchNorm gamma, beta, running mean, running var (fold_bn=False), or
    'L/affine'  float32 (2, c_out_kept): s = gamma / sqrt(var + eps), t = beta - mean * s (fold_bn=True):
                        the layer computes conv(x, w_q) * s + t.
    'dense/<collection>/<module>/<name>'  float32: the head (dense layers, and their BatchNorm if any), sliced
                        to the kept inputs.
    '__manifest__'  uint8: UTF-8 JSON with 'format' ('picpq-jax-export'), 'version', 'description', 'arch',
                        'num_classes', 'image_size', 'in_channels' (to rebuild the spec with models.get_spec),
                        'fold_bn', 'bn_epsilon', 'dense_params' (entries of the unpruned model's params), 'meta'
                        (the caller's JSON object) and 'layers': per conv {'name', 'kept' (sorted kept output
                        channel indices of the unpruned layer), 'weight_bits', 'act_bits', 'kernel_shape' (slim),
                        'scale', 'code_dtype'}.

The quantized kernel is rebuilt as w_q = float32(code * scale), the product taken in float64; 'scale' is a JSON
number holding a float32 exactly: the step of `quant.weight_codes`, float32(1 / n) for 2 <= k < 32
(n = 2^(min(k, 24) - 1) - 1; k >= 24 uses n = 2^23 - 1 as it does), mean|w| for k = 1. The codes are those of
`quant.weight_codes` applied to the WHOLE kernel of the masked model (its max|tanh w| and mean|w| run over
pruned channels too) and then sliced to the kept channels, so the rebuilt weights are exactly the masked
model's fake-quantized weights.

Loading (`load_model`) returns `Net(slim spec)`, whose conv units still hold a BatchNorm, its variables with the
DEQUANTIZED kernels, and `bits = {L: [weight_bits_L, act_bits_L]}`. The slim spec marks every conv
`kernel_on_grid`, so its weight codes are read back from the kernel (`quant.grid_weight_codes`) instead of
being quantized again, while the input activations are quantized as in the masked model. A folded export
loads as BatchNorm variables that make BN the affine map: scale = s, bias = t, mean = 0, var = 1 - eps
(rounded so that var + eps == 1 in float32; Flax computes (x - mean) * scale * rsqrt(var + eps) + bias =
x * s + t), so the same `Net` runs both kinds of export.

How equal is "equal": both models convolve the same integer codes (quant.py) and scale each sum by the same
float32 step. Sums of integer products are exact in float32 in any order while below 2^24 in magnitude
(|sum| <= fan-in x n_act x n_weight: guaranteed at 4-bit weights and activations up to a fan-in of 159,783;
at 8/8 bits over a 3 x 3 x 64 fan-in, a sum past 2^24 needs 90 % of all products at their extreme with one
sign). So BatchNorm, residual adds and activation quantizers see bit-identical inputs, and an unfolded export
gives the masked model's logits up to the order of the head's final sum (~1e-6). Folding BN rounds the affine
map differently, which can move a rare activation across a quantizer's rounding step (~0.1 on that image).
32-bit layers convolve floats: the stem reads the same image channels in both models; any other 32-bit layer
shares folding's risk. `logit_difference` measures it.

CoDeQ's dead-zone quantizer (quant.deadzone_*; `export_model(..., quantizers={L: {'name': 'codeq', 'step': s,
'shift': sh, 'bits': B, ...}})`, a Policy's per-layer quantizer). Such a conv stores its dead-zone codes q
(in [-Q, Q], Q = 2^(B-1) - 1, packed at B bits as above) and its manifest entry holds 'quantizer': 'codeq',
'step' and 'shift' (float32 values as JSON numbers) and 'scale': null; it is rebuilt as
w = float32(s q + sh sign(q)) (float32 arithmetic, as quant.deadzone_dequant), and loads with weight bits 32
in `bits`, so that the model uses the rebuilt kernel as it is (no quantizer applied again). A head layer named
in `quantizers` is stored as its dequantized float32 kernel under 'dense/...' (the head is small), and the
quantizers' logits are not stored. A file with a CoDeQ layer is version 2 (version 1 otherwise).

The OPQ-style unified channel-wise quantizer (quant.opq_*; `quantizers={L: {'name': 'opq', 'step': d,
'scales': [s_c, ...]}}`, methods/opq.py). Such a conv stores the codes q of quant.opq_codes (in [-Q, Q],
packed at its weight bits as above) and its manifest entry holds 'quantizer': 'opq' and 'scale': d, the ONE
step its channels share; each channel's s_c is folded into the conv's BatchNorm (gamma *= s_c,
running mean /= s_c: BN(s_c y) with the old statistics is BN'(y) with the new ones; with fold_bn the affine
map follows). It is rebuilt as w = float32(q * d) and loads with weight bits 32 in `bits`, so that the model
uses the rebuilt kernel as it is. An export with an OPQ-style layer is version 2 as well.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import zipfile
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax import bits as bits_lib
from picpq_jax import checkpoints, models, quant
from picpq_jax.models.layers import BN_EPSILON
from picpq_jax.models.spec import ArchSpec
from picpq_jax.topology import Topology, kernel_input_channels, kernel_keep, topology_from_spec

FORMAT = 'picpq-jax-export'
VERSION = 1  # PIC-PQ exports (and every export without a CoDeQ layer)
CODEQ_VERSION = 2  # an export with CoDeQ layers: manifest entries carry 'quantizer', 'step', 'shift'
READ_VERSIONS = (VERSION, CODEQ_VERSION)
CODEQ = 'codeq'
OPQ = 'opq'
QUANTIZER_LEAVES = ('logit_dz', 'logit_bit')  # a CoDeQ layer's own parameters, not part of the network
MANIFEST_KEY = '__manifest__'
FULL_PRECISION = 32
_DESCRIPTION = (
    'Slimmed CNN (pruned channels removed). Per conv L: "L/codes" = uint8 bit-packed integer weight codes '
    '(weight_bits bits each, MSB first, C order, unsigned offset code + n with n = 2^(bits-1) - 1; 1-bit: '
    '0/1 for -1/+1) of the slim HWIO kernel, w = float32(code * scale); or "L/kernel" float32 for 32-bit layers; '
    '"L/bn" float32 rows gamma, beta, mean, var, or (fold_bn) "L/affine" rows s, t with y = conv(x, w) * s + t. '
    'Activations of L are quantized to act_bits before the conv. "dense/..." float32 head. See '
    'picpq_jax/export.py.')
_PACK_CHUNK = 1 << 20  # codes per packing step (a multiple of 8, so chunks end on byte boundaries)


# --------------------------------------------------------------------------------------------------------
# Slimming
# --------------------------------------------------------------------------------------------------------


def kept_indices(spec: ArchSpec, masks: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
  """layer name -> sorted indices of the kept output channels (all channels of an unmasked layer)."""
  masks = masks or {}
  return {c.name: (np.flatnonzero(np.asarray(masks[c.name]) > 0.5) if c.name in masks
                   else np.arange(c.out_channels)) for c in spec.convs}


def slim_spec(spec: ArchSpec, keep: Mapping[str, np.ndarray], kernel_on_grid: bool = False) -> ArchSpec:
  """The spec of the slimmed network: every conv's channels (and a depthwise conv's groups) cut to `keep`.

  kernel_on_grid: its kernels will hold quantized weights (an export's), read back as codes by the model.
  """
  convs = []
  for c in spec.convs:
    out = len(keep[c.name])
    inp = spec.in_channels if c.source is None else len(keep[c.source])
    groups = out if c.depthwise else c.groups
    convs.append(dataclasses.replace(c, in_channels=inp, out_channels=out, groups=groups,
                                     kernel_on_grid=kernel_on_grid))
  head = list(spec.head)
  head[0] = dataclasses.replace(head[0], in_features=len(keep[head[0].source]))
  return dataclasses.replace(spec, convs=tuple(convs), head=tuple(head))


def _slim_kernel(topo: Topology, slim: Topology, channel_keep: Mapping[str, np.ndarray], name: str,
                 kernel: np.ndarray) -> np.ndarray:
  """Conv `name`'s kernel cut to the entries the channel masks keep (`topology.kernel_keep`, the one rule),
  laid out as the slim conv (`slim`, the topology of `slim_spec`) reads them; ValueError when no slim conv
  can (a grouped conv whose groups keep different numbers of channels)."""
  layer, slim_layer = topo.layer(name), slim.layer(name)
  in_keep, out_keep = kernel_keep(topo, channel_keep, name)
  filters = np.flatnonzero(out_keep)
  live = np.asarray(in_keep, bool)[:, filters].T  # (kept filters, in / groups): the entries each one keeps
  width = slim_layer.in_channels // max(slim_layer.groups, 1)
  fits = (slim_layer.groups >= 1 and slim_layer.in_channels % slim_layer.groups == 0
          and slim_layer.out_channels % slim_layer.groups == 0 and np.all(live.sum(axis=1) == width))
  if fits:
    rows = np.nonzero(live)[1].reshape(filters.size, width).T  # (kept inputs per group, kept filters)
    inputs = channel_keep.get(layer.source, np.ones(layer.in_channels, bool))
    # The slim conv must read, at each entry, the input channel the masked conv reads there.
    fits = np.array_equal(kernel_input_channels(layer)[rows, filters],
                          np.flatnonzero(inputs)[kernel_input_channels(slim_layer)])
  if not fits:
    raise ValueError(f'masks of conv {name!r} (groups={layer.groups}) keep different numbers of channels in '
                     f'its groups, so no slim conv reads what the masked one reads; keep as many channels in '
                     f'every group (a depthwise conv and its source in one chain).')
  return kernel[:, :, rows, filters]


def slice_variables(spec: ArchSpec, variables: Mapping[str, Any], keep: Mapping[str, np.ndarray]) -> dict:
  """Cut `variables` ({'params', 'batch_stats'}) of the masked model down to the kept channels."""
  topo, slim = topology_from_spec(spec), topology_from_spec(slim_spec(spec, keep))
  channel_keep = {}
  for c in spec.convs:
    channel_keep[c.name] = np.zeros(c.out_channels, bool)
    channel_keep[c.name][keep[c.name]] = True
  params = {k: v for k, v in variables['params'].items()}
  stats = {k: v for k, v in variables.get('batch_stats', {}).items()}
  for c in spec.convs:
    out = keep[c.name]
    kernel = _slim_kernel(topo, slim, channel_keep, c.name, np.asarray(params[c.name]['kernel']))
    bn = {k: np.asarray(v)[out] for k, v in params[c.name]['bn'].items()}
    params[c.name] = {'kernel': kernel, 'bn': bn}
    if c.name in stats:
      stats[c.name] = {'bn': {k: np.asarray(v)[out] for k, v in stats[c.name]['bn'].items()}}
  first = spec.head[0]
  dense = dict(params[first.name])
  dense['kernel'] = np.asarray(dense['kernel'])[keep[first.source], :]
  params[first.name] = dense
  out = {'params': params}
  if stats:
    out['batch_stats'] = stats
  return out


# --------------------------------------------------------------------------------------------------------
# Integer codes
# --------------------------------------------------------------------------------------------------------


def code_dtype(bits: int) -> np.dtype:
  """The integer type that holds a `bits`-bit code: int8 (<= 8), int16 (<= 16), int32 (<= 31)."""
  return np.dtype(np.int8 if bits <= 8 else np.int16 if bits <= 16 else np.int32)


def _check_pack_bits(bits) -> int:
  if not (np.ndim(bits) == 0 and float(bits) == int(bits) and 1 <= int(bits) < FULL_PRECISION):
    raise ValueError(f'bits = {bits!r}: integer codes have 1..31 bits (a 32-bit layer is stored as float32).')
  return int(bits)


def pack_codes(codes, bits: int) -> np.ndarray:
  """Signed integer codes -> uint8 array of ceil(size * bits / 8) bytes, each code in exactly `bits` bits.

  2 <= bits <= 31: codes in [-n, n] with n = 2^(bits-1) - 1, stored as code + n (MSB first). bits = 1: codes
  -1 / +1, stored as 0 / 1. Codes are taken in C order; ValueError for a code outside the range.
  """
  b = _check_pack_bits(bits)
  c = np.asarray(codes).reshape(-1)
  if c.size and not np.issubdtype(c.dtype, np.integer):
    if not np.array_equal(c, np.round(c)):
      raise ValueError(f'{b}-bit codes must be integers.')
  c = c.astype(np.int64)
  if b == 1:
    if not np.isin(c, (-1, 1)).all():
      raise ValueError('1-bit codes must be -1 or +1.')
    return np.packbits(c > 0)
  n = 2 ** (b - 1) - 1
  if c.size and np.abs(c).max() > n:
    raise ValueError(f'{b}-bit codes must lie in [-{n}, {n}], got {c.min()}..{c.max()}.')
  u = (c + n).astype(np.uint64)
  shifts = np.arange(b - 1, -1, -1, dtype=np.uint64)
  chunks = [np.packbits(((u[i:i + _PACK_CHUNK, None] >> shifts) & np.uint64(1)).astype(np.uint8))
            for i in range(0, u.size, _PACK_CHUNK)]
  return np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)


def unpack_codes(packed, bits: int, count: int) -> np.ndarray:
  """Inverse of `pack_codes`: the first `count` codes, as `code_dtype(bits)`."""
  b = _check_pack_bits(bits)
  packed = np.asarray(packed)
  if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != -(-count * b // 8):
    raise ValueError(f'{count} codes of {b} bits take {-(-count * b // 8)} bytes (uint8), got '
                     f'{packed.size} ({packed.dtype}).')
  if b == 1:
    return (np.unpackbits(packed, count=count).astype(np.int8) * 2 - 1).astype(code_dtype(1))
  n = 2 ** (b - 1) - 1
  weights = (np.uint64(1) << np.arange(b - 1, -1, -1, dtype=np.uint64))
  step = _PACK_CHUNK * b // 8  # bytes per chunk of _PACK_CHUNK codes
  out = []
  for start in range(0, count, _PACK_CHUNK):
    k = min(_PACK_CHUNK, count - start)
    chunk = packed[start // _PACK_CHUNK * step:][:step]
    bitarr = np.unpackbits(chunk, count=k * b).reshape(k, b).astype(np.uint64)
    out.append(((bitarr * weights).sum(axis=1).astype(np.int64) - n).astype(code_dtype(b)))
  return np.concatenate(out) if out else np.zeros(0, code_dtype(b))


@jax.jit
def _weight_codes_many(kernels, bits):
  """quant.weight_codes of several kernels in one compiled call (bits traced, as in the model)."""
  return [quant.weight_codes(k, b) for k, b in zip(kernels, bits)]


def quantize_kernels(kernels: Sequence[Any], bits: Sequence[int]) -> list[tuple[np.ndarray, float]]:
  """[(codes, scale)] of `quant.weight_codes(kernel, bits)` over each WHOLE kernel, 1 <= bits < 32.

  codes (the kernel's shape, `code_dtype(bits)`) are integers in [-n, n] (1 bit: -1 / +1); scale is the float32
  step as a Python float, so float32(codes * scale) (the product in float64, exact) is exactly
  quant.weight_quant's output.
  """
  bits = [_check_pack_bits(b) for b in bits]
  kernels = [np.asarray(k, np.float32) for k in kernels]
  coded = _weight_codes_many([jnp.asarray(k) for k in kernels], [jnp.asarray(b, jnp.int32) for b in bits])
  out = []
  for b, (codes, step) in zip(bits, coded):
    codes = np.asarray(codes)
    if not np.array_equal(codes, np.round(codes)):
      raise RuntimeError(f'quant.weight_codes gave non-integer codes at {b} bits; this is a bug.')
    out.append((codes.astype(code_dtype(b)), float(np.float32(step))))
  return out


def quantize_kernel(kernel, bits: int) -> tuple[np.ndarray, float]:
  """(codes, scale) of one kernel; see `quantize_kernels`."""
  return quantize_kernels([kernel], [bits])[0]


def dequantize(codes, scale: float) -> np.ndarray:
  """w_q = float32(codes * scale), the product in float64."""
  return (np.asarray(codes, np.float64) * scale).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------


def _layer_bits(spec: ArchSpec, bits: Optional[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
  """layer name -> (weight_bits, act_bits); an int means both; absent layers are 32/32."""
  bits = dict(bits or {})
  bits_lib.validate_bits(topology_from_spec(spec), bits)
  out = {}
  for c in spec.convs:
    v = np.asarray(bits.get(c.name, FULL_PRECISION)).reshape(-1)
    out[c.name] = (int(v[0]), int(v[-1]))
  return out


def _checked_keep(spec: ArchSpec, masks: Optional[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """Validated masks -> kept indices: known layers, right length, 0/1, chains respected, >= 1 channel."""
  topo = topology_from_spec(spec)
  keep_bool = bits_lib.keep_vectors(topo, dict(masks or {}))
  for chain, members in topo.chains.items():
    widest = max(members, key=lambda m: keep_bool[m].size)
    for m in members:
      if not np.array_equal(keep_bool[m], keep_bool[widest][:keep_bool[m].size]):
        raise ValueError(f'masks of {m!r} and {widest!r} differ on their common channels, but both are in '
                         f'chain {chain!r} (outputs added together); give the chain one mask (a member of '
                         f'width n takes its first n entries).')
  for name, k in keep_bool.items():
    if not k.any():
      raise ValueError(f'masks[{name!r}] keeps no channel; a slim network needs at least one per layer.')
  return {name: np.flatnonzero(k) for name, k in keep_bool.items()}


def _check_variables(spec: ArchSpec, variables: Mapping[str, Any]) -> None:
  if 'params' not in variables or 'batch_stats' not in variables:
    raise ValueError('variables must hold the masked model\'s "params" and "batch_stats" collections.')
  for c in spec.convs:
    want = (c.kernel, c.kernel, c.in_channels // c.groups, c.out_channels)
    got = np.shape(variables['params'].get(c.name, {}).get('kernel'))
    if got != want:
      raise ValueError(f'variables do not match {spec.arch}: kernel of {c.name!r} has shape {got}, the spec '
                       f'expects {want}; pass the variables of the model built from this spec.')


def _flatten(tree: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f'{prefix}/{k}'))
    else:
      out[f'{prefix}/{k}'] = np.asarray(v, np.float32)
  return out


def _num_entries(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _num_dense_entries(params) -> int:
  """Entries of the network's params, without a quantizer's own parameters (CoDeQ's logits)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return int(sum(np.size(x) for path, x in flat
                 if getattr(path[-1], 'key', None) not in QUANTIZER_LEAVES))


def _codeq_quantizers(spec: ArchSpec, variables: Mapping[str, Any], layer_bits: Mapping[str, tuple[int, int]],
                      quantizers: Optional[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict]:
  """layer name -> {'step', 'shift', 'bits'} of the layers (convs and head) whose quantizer is CoDeQ's,
  checked against the spec, the bits and the variables."""
  out = {}
  known = {c.name for c in spec.convs} | {d.name for d in spec.head}
  for name, q in (quantizers or {}).items():
    if q.get('name', 'picpq') != CODEQ:
      continue
    if name not in known:
      raise ValueError(f'quantizers name layer {name!r}, which {spec.arch} does not have.')
    if name in layer_bits and int(q['bits']) != layer_bits[name][0]:
      raise ValueError(f'quantizers[{name!r}] has bits={q["bits"]} but bits[{name!r}] gives '
                       f'{layer_bits[name][0]} weight bits; pass the bits of the same policy.')
    if not 2 <= int(q['bits']) < FULL_PRECISION:
      raise ValueError(f'quantizers[{name!r}] has bits={q["bits"]}; a CoDeQ layer has 2..31 bits.')
    out[name] = {'step': float(np.float32(q['step'])), 'shift': float(np.float32(q['shift'])),
                 'bits': int(q['bits'])}
  for d in spec.head:
    if d.name not in out and any(k in variables['params'].get(d.name, {}) for k in QUANTIZER_LEAVES):
      raise ValueError(f'head layer {d.name!r} has CoDeQ logits but `quantizers` does not name it; pass its '
                       "{'name': 'codeq', 'step', 'shift', 'bits'} (the method's summary has them).")
  return out


def _opq_quantizers(spec: ArchSpec, layer_bits: Mapping[str, tuple[int, int]],
                    quantizers: Optional[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict]:
  """layer name -> {'step', 'scales', 'bits'} of the convs whose quantizer is OPQ-style and whose weight bits
  are below 32, checked against the spec."""
  out = {}
  convs = {c.name: c for c in spec.convs}
  for name, q in (quantizers or {}).items():
    if q.get('name', 'picpq') != OPQ:
      continue
    if name not in convs:
      raise ValueError(f'quantizers name layer {name!r}, which {spec.arch} does not have as a conv.')
    if np.shape(q['scales']) != (convs[name].out_channels,):
      raise ValueError(f'quantizers[{name!r}] has {np.size(q["scales"])} scales; the conv has '
                       f'{convs[name].out_channels} output channels.')
    if layer_bits[name][0] < FULL_PRECISION:
      out[name] = {'step': float(np.float32(q['step'])), 'scales': np.asarray(q['scales'], np.float32),
                   'bits': layer_bits[name][0]}
  return out


def _opq_kernel_codes(kernel, q: Mapping[str, Any]) -> np.ndarray:
  codes, _ = quant.opq_codes(jnp.asarray(kernel, jnp.float32), q['step'], q['scales'], q['bits'])
  return np.asarray(codes).astype(code_dtype(q['bits']))


def _deadzone_kernel_codes(kernel, q: Mapping[str, Any]) -> np.ndarray:
  codes = np.asarray(quant.deadzone_codes_at(jnp.asarray(kernel, jnp.float32), q['step'], q['shift'], q['bits']))
  return codes.astype(code_dtype(q['bits']))


def deadzone_dequantize(codes, step: float, shift: float) -> np.ndarray:
  """w = float32(s q + sh sign(q)), each operation in float32 (quant.deadzone_dequant's formula)."""
  q = np.asarray(codes, np.float32)
  return (np.float32(step) * q + np.float32(shift) * np.sign(q)).astype(np.float32)


def export_model(path: str, spec: ArchSpec, variables: Mapping[str, Any], masks: Optional[Mapping[str, Any]],
                 bits: Optional[Mapping[str, Any]], *, fold_bn: bool = False,
                 meta: Optional[Mapping[str, Any]] = None,
                 quantizers: Optional[Mapping[str, Mapping[str, Any]]] = None) -> dict:
  """Write the compressed model (slim, integer weights; format in the module docstring) to `path`.

  Args:
    path: the file to write (conventionally '*.npz'); replaced atomically.
    spec: the model's ArchSpec (models.get_spec).
    variables: {'params', 'batch_stats'} of the trained masked model (full, unpruned shapes).
    masks: layer name -> 0/1 vector per output channel (chain members share one mask); absent: all kept.
    bits: layer name -> bits of weights and activations (or a (weight, activation) pair); absent: 32.
    fold_bn: store each conv's BatchNorm folded into a per-channel scale and shift (float32).
    meta: a JSON-serializable dict stored in the manifest (e.g. the run's config and accuracy).
    quantizers: layer name -> {'name': ..., parameters} (a Policy's `layers[name].quantizer`); layers whose
      name is 'codeq' are coded with CoDeQ's dead-zone grid ('step', 'shift', 'bits'; module docstring),
      convs and head layers alike; the others (absent, 'picpq') as before.

  Returns:
    `size_report(path)`.
  """
  layer_bits = _layer_bits(spec, bits)
  keep = _checked_keep(spec, masks)
  _check_variables(spec, variables)
  try:
    meta_json = json.loads(json.dumps(dict(meta or {})))
  except (TypeError, ValueError) as e:
    raise ValueError(f'meta must be a JSON-serializable dict ({e}).') from None

  codeq_layers = _codeq_quantizers(spec, variables, layer_bits, quantizers)
  # Quantize every kernel WHOLE (as the masked model does), then slice codes and everything else together.
  params = {k: ({n: x for n, x in v.items() if n not in QUANTIZER_LEAVES} if isinstance(v, Mapping) else v)
            for k, v in variables['params'].items()}
  for d in spec.head:
    if d.name in codeq_layers:
      q = codeq_layers[d.name]
      params[d.name]['kernel'] = deadzone_dequantize(_deadzone_kernel_codes(params[d.name]['kernel'], q),
                                                     q['step'], q['shift'])
  for name in [c.name for c in spec.convs if c.name in codeq_layers]:
    params[name]['kernel'] = _deadzone_kernel_codes(params[name]['kernel'], codeq_layers[name])
  opq_layers = _opq_quantizers(spec, layer_bits, quantizers)
  batch_stats = variables['batch_stats']
  if opq_layers:
    batch_stats = dict(batch_stats)
    for name, q in opq_layers.items():
      # Codes on the shared grid; the channel scales folded into this conv's BatchNorm.
      params[name] = {**params[name], 'kernel': _opq_kernel_codes(params[name]['kernel'], q),
                      'bn': {**params[name]['bn'],
                             'scale': np.asarray(params[name]['bn']['scale'], np.float32) * q['scales']}}
      stats = batch_stats[name]['bn']
      batch_stats[name] = {**batch_stats[name],
                           'bn': {**stats, 'mean': np.asarray(stats['mean'], np.float32) / q['scales']}}
  quantized = [c.name for c in spec.convs
               if layer_bits[c.name][0] < FULL_PRECISION and c.name not in codeq_layers
               and c.name not in opq_layers]
  coded = quantize_kernels([variables['params'][name]['kernel'] for name in quantized],
                           [layer_bits[name][0] for name in quantized])
  scales = {}
  for name, (codes, scale) in zip(quantized, coded):
    params[name]['kernel'], scales[name] = codes, scale
  slim = slice_variables(spec, {'params': params, 'batch_stats': batch_stats}, keep)

  conv_names = {c.name for c in spec.convs}
  arrays, layers = {}, []
  for c in spec.convs:
    w_bits, a_bits = layer_bits[c.name]
    kernel = slim['params'][c.name]['kernel']
    if w_bits < FULL_PRECISION:
      arrays[f'{c.name}/codes'] = pack_codes(kernel, w_bits)
    else:
      arrays[f'{c.name}/kernel'] = np.asarray(kernel, np.float32)
    bn = {k: np.asarray(v, np.float32) for k, v in slim['params'][c.name]['bn'].items()}
    stats = {k: np.asarray(v, np.float32) for k, v in slim['batch_stats'][c.name]['bn'].items()}
    if fold_bn:
      s = bn['scale'] * (np.float32(1) / np.sqrt(stats['var'] + np.float32(BN_EPSILON)))
      arrays[f'{c.name}/affine'] = np.stack([s, bn['bias'] - stats['mean'] * s]).astype(np.float32)
    else:
      arrays[f'{c.name}/bn'] = np.stack([bn['scale'], bn['bias'], stats['mean'], stats['var']])
    layers.append(dict(
        name=c.name, kept=keep[c.name].tolist(), weight_bits=w_bits, act_bits=a_bits,
        kernel_shape=list(np.shape(kernel)), scale=scales.get(c.name),
        code_dtype=code_dtype(w_bits).name if w_bits < FULL_PRECISION else 'float32'))
    if c.name in codeq_layers:
      layers[-1].update(quantizer=CODEQ, step=codeq_layers[c.name]['step'], shift=codeq_layers[c.name]['shift'])
    if c.name in opq_layers:
      layers[-1].update(quantizer=OPQ, scale=opq_layers[c.name]['step'])
  for collection in ('params', 'batch_stats'):
    rest = {k: v for k, v in slim.get(collection, {}).items() if k not in conv_names}
    arrays.update(_flatten(rest, f'dense/{collection}'))

  manifest = dict(
      format=FORMAT, version=CODEQ_VERSION if (codeq_layers or opq_layers) else VERSION, description=_DESCRIPTION,
      arch=spec.arch, num_classes=spec.num_classes, image_size=spec.image_size, in_channels=spec.in_channels,
      fold_bn=bool(fold_bn), bn_epsilon=BN_EPSILON, dense_params=_num_dense_entries(variables['params']),
      layers=layers, meta=meta_json)
  arrays[MANIFEST_KEY] = np.frombuffer(json.dumps(manifest).encode('utf-8'), np.uint8)
  checkpoints.write_npz(path, arrays)
  return size_report(path)


# --------------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------------


def _not_an_export(path, why: str) -> ValueError:
  return ValueError(f'{path} is not a picpq-jax export ({why}); write one with export.export_model.')


def read_export(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(manifest, arrays) of an export file; ValueError if `path` is not one (FileNotFoundError if absent)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'No export file at {path}.')
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise _not_an_export(path, f'not a readable .npz: {type(e).__name__}') from None
  if MANIFEST_KEY not in arrays:
    raise _not_an_export(path, f'no {MANIFEST_KEY!r} entry')
  try:
    manifest = json.loads(arrays.pop(MANIFEST_KEY).tobytes().decode('utf-8'))
  except (UnicodeDecodeError, ValueError):
    raise _not_an_export(path, 'its manifest is not JSON') from None
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise _not_an_export(path, f'its manifest has no format {FORMAT!r}')
  if manifest.get('version') not in READ_VERSIONS:
    raise ValueError(f'{path} is a picpq-jax export of format version {manifest.get("version")!r}; this '
                     f'version of picpq_jax reads versions {list(READ_VERSIONS)}.')
  return manifest, arrays


def _fold_var(epsilon: float) -> np.float32:
  """The float32 v nearest 1 - eps with v + eps == 1 exactly in float32 (so BN divides by rsqrt(1) = 1)."""
  eps = np.float32(epsilon)
  v = np.float32(1) - eps
  while v + eps > 1:
    v = np.nextafter(v, np.float32(0))
  while v + eps < 1:
    v = np.nextafter(v, np.float32(2))
  return v


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  out: dict = {}
  for key, v in flat.items():
    node = out
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(v, jnp.float32)
  return out


def load_model(path: str):
  """Rebuild the slim model of an export: (module, variables, bits).

  module = models.Net(slim spec), applied without masks: `module.apply(variables, x, bits=bits)`;
  variables hold the dequantized kernels (and, for a folded export, BatchNorm variables that are the folded
  affine map); bits = {layer: int32 [weight_bits, act_bits]}. The slim spec marks its kernels as on their
  grid, so the model reads their codes back instead of quantizing them again. A CoDeQ layer's kernel holds
  s q + sh sign(q) and its weight bits in `bits` are 32: the model uses that kernel as it is.
  """
  manifest, arrays = read_export(path)
  try:
    spec = models.get_spec(manifest['arch'], manifest['num_classes'], manifest['image_size'],
                           manifest['in_channels'])
    entries = {l['name']: l for l in manifest['layers']}
    keep = {c.name: np.asarray(entries[c.name]['kept'], np.int64) for c in spec.convs}
    slim = slim_spec(spec, keep, kernel_on_grid=True)
    fold = bool(manifest['fold_bn'])
    params, stats, bits = {}, {}, {}
    for c in slim.convs:
      entry = entries[c.name]
      shape = (c.kernel, c.kernel, c.in_channels // c.groups, c.out_channels)
      if tuple(entry['kernel_shape']) != shape:
        raise ValueError(f'layer {c.name!r} has kernel shape {entry["kernel_shape"]}, its kept channels '
                         f'give {list(shape)}')
      w_bits = int(entry['weight_bits'])
      if entry.get('quantizer') == CODEQ:
        codes = unpack_codes(arrays[f'{c.name}/codes'], w_bits, math.prod(shape))
        kernel = deadzone_dequantize(codes.reshape(shape), float(entry['step']), float(entry['shift']))
        w_bits = FULL_PRECISION  # the kernel holds its levels already
      elif entry.get('quantizer') == OPQ:
        codes = unpack_codes(arrays[f'{c.name}/codes'], w_bits, math.prod(shape))
        kernel = dequantize(codes.reshape(shape), float(entry['scale']))
        w_bits = FULL_PRECISION  # the kernel holds its levels already (channel scales are in the BatchNorm)
      elif w_bits < FULL_PRECISION:
        codes = unpack_codes(arrays[f'{c.name}/codes'], w_bits, math.prod(shape))
        kernel = dequantize(codes.reshape(shape), float(entry['scale']))
      else:
        kernel = np.asarray(arrays[f'{c.name}/kernel'], np.float32).reshape(shape)
      if fold:
        s, t = np.asarray(arrays[f'{c.name}/affine'], np.float32).reshape(2, c.out_channels)
        bn = dict(scale=s, bias=t)
        st = dict(mean=np.zeros_like(s), var=np.full_like(s, _fold_var(manifest['bn_epsilon'])))
      else:
        g, b, m, v = np.asarray(arrays[f'{c.name}/bn'], np.float32).reshape(4, c.out_channels)
        bn, st = dict(scale=g, bias=b), dict(mean=m, var=v)
      params[c.name] = {'kernel': jnp.asarray(kernel), 'bn': {k: jnp.asarray(x) for k, x in bn.items()}}
      stats[c.name] = {'bn': {k: jnp.asarray(x) for k, x in st.items()}}
      bits[c.name] = jnp.asarray([w_bits, int(entry['act_bits'])], jnp.int32)
    dense = _unflatten({k[len('dense/'):]: v for k, v in arrays.items() if k.startswith('dense/')})
    params.update(dense.get('params', {}))
    stats.update(dense.get('batch_stats', {}))
  except (KeyError, TypeError, ValueError) as e:
    raise _not_an_export(path, f'its content is inconsistent: {type(e).__name__}: {e}') from None
  return models.Net(slim), {'params': params, 'batch_stats': stats}, bits


# --------------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------------


def size_report(path: str) -> dict:
  """Sizes of an export file, in bytes.

  dense_fp32_bytes: 4 per entry of the unpruned model's params collection. export_bytes: the file.
  ideal_bytes: sum over convs of kept weights * weight_bits / 8, plus 4 bytes per float of everything else the
  file holds (BatchNorm or folded scale/shift, one weight scale per quantized conv, the head), rounded up;
  no container overhead. ratio = dense / export, ideal_ratio = dense / ideal.
  """
  manifest, arrays = read_export(path)
  conv_bits = sum(math.prod(l['kernel_shape']) * l['weight_bits'] for l in manifest['layers'])
  weight_arrays = {f'{l["name"]}/codes' for l in manifest['layers']} | {
      f'{l["name"]}/kernel' for l in manifest['layers']}
  floats = sum(a.size for k, a in arrays.items() if k not in weight_arrays)
  # The weight scales: one per quantized conv, two (step, shift) per CoDeQ conv.
  floats += sum((2 if l.get('quantizer') == CODEQ else 1) * (l['weight_bits'] < FULL_PRECISION)
                for l in manifest['layers'])
  dense = 4 * int(manifest['dense_params'])
  export = os.path.getsize(path)
  ideal = math.ceil(conv_bits / 8 + 4 * floats)
  return dict(dense_fp32_bytes=dense, export_bytes=export, ideal_bytes=ideal, ratio=dense / export,
              ideal_ratio=dense / ideal,
              conv_weights=sum(math.prod(l['kernel_shape']) for l in manifest['layers']),
              conv_weight_bits=conv_bits)


# --------------------------------------------------------------------------------------------------------
# Equivalence check
# --------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def compiled_apply(spec: ArchSpec):
  """`jax.jit(models.Net(spec).apply)`, one per spec (an ArchSpec is hashable), so that checking several
  exports of one model compiles each network once."""
  return jax.jit(models.Net(spec).apply)


CODEQ_TOLERANCE = 1e-4  # relative to max(1, max |logit|): see logit_difference


def logit_difference(path: str, spec: ArchSpec, variables: Mapping[str, Any],
                     masks: Optional[Mapping[str, Any]], bits: Optional[Mapping[str, Any]], x, *,
                     model=None) -> np.ndarray:
  """Per image of the batch x: max |logits of the masked fake-quantized model - logits of the loaded export|.

  Both run in eval mode, compiled. An unfolded export agrees to ~1e-6 (the module docstring says why); a
  folded one can differ on a rare image by ~0.1 (one activation rounded the other way); a wrong export
  differs on every image.

  model: the Net that ran the policy when it is not `Net(spec)`, e.g. CoDeQ's (quantizer='codeq'), whose
  fake-quantized kernels W^ = s q + sh sign(q) are compared with the export's rebuilt ones. Those are not
  integer codes times one scale, so the sums are ordinary float32 sums, not exact: the two models hold the
  same kernel values up to one float32 rounding of s q + sh sign(q) (XLA may fuse it into one FMA, numpy
  does not), which leaves the logits equal to float32 rounding, CODEQ_TOLERANCE = 1e-4 x max(1, max |logit|)
  (ResNet-20 on MNIST: ~1e-6 measured). With activations quantized (act_bits < 32) CoDeQ's model multiplies
  the activation codes by their step before the conv and the export after it, so a rare activation can round
  the other way (as with folded BatchNorm, ~0.1 on that image).
  """
  masks = {k: jnp.asarray(v, jnp.float32) for k, v in (masks or {}).items()}
  apply = compiled_apply(spec) if model is None else jax.jit(model.apply)
  want = apply(variables, x, masks=masks, bits=bits_lib.bits_tree(bits or {}))
  module, slim_vars, slim_bits = load_model(path)
  got = compiled_apply(module.spec)(slim_vars, x, bits=slim_bits)
  return np.asarray(jnp.max(jnp.abs(got - want), axis=-1))
