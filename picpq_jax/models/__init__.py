"""The model zoo: every architecture is an `ArchSpec` executed by `Net`."""
from __future__ import annotations

from picpq_jax.models import mobilenetv2, resnet_cifar, resnet_imagenet, vgg
from picpq_jax.models.net import Net
from picpq_jax.models.spec import ArchSpec, BlockSpec, ConvSpec, DenseSpec

_BUILDERS = {
    'resnet8': lambda **kw: resnet_cifar.build_spec(8, **kw),  # the family's smallest: fast end-to-end tests
    'resnet20': lambda **kw: resnet_cifar.build_spec(20, **kw),
    'resnet56': lambda **kw: resnet_cifar.build_spec(56, **kw),
    'resnet110': lambda **kw: resnet_cifar.build_spec(110, **kw),
    'vgg16': vgg.build_spec,
    'mobilenetv2': mobilenetv2.build_spec,
    'resnet18': lambda **kw: resnet_imagenet.build_spec(18, **kw),
    'resnet50': lambda **kw: resnet_imagenet.build_spec(50, **kw),
}
ARCHS = tuple(_BUILDERS)


def get_spec(arch: str, num_classes: int, image_size: int, in_channels: int) -> ArchSpec:
  """The architecture spec of `arch` for the given data shape."""
  if arch not in _BUILDERS:
    raise ValueError(f'model.arch={arch!r} is not an architecture of the zoo; choose one of {list(ARCHS)}.')
  return _BUILDERS[arch](num_classes=num_classes, image_size=image_size, in_channels=in_channels)


def create_model(arch: str, num_classes: int, image_size: int, in_channels: int, quantizer: str = 'picpq',
                 **quantizer_settings) -> Net:
  """Net of `arch` for the data shape. quantizer: 'picpq' (PIC-PQ's, at the bits given to apply) or 'codeq'
  (CoDeQ's dead-zone quantizer in every conv and the head; quantizer_settings: max_bits, fixed_bits,
  end_bits, see Net)."""
  return Net(get_spec(arch, num_classes, image_size, in_channels), quantizer=quantizer, **quantizer_settings)


__all__ = ['ARCHS', 'ArchSpec', 'BlockSpec', 'ConvSpec', 'DenseSpec', 'Net', 'create_model', 'get_spec']
