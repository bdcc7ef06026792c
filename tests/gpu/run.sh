#!/bin/sh
# The TensorRT tests, on a machine with an NVIDIA GPU, CUDA torch and TensorRT 10.14 or newer:
#   pip install tensorrt --extra-index-url https://pypi.nvidia.com && sh tests/gpu/run.sh
set -e
cd "$(dirname "$0")/../.."
python -c "import tensorrt, torch; assert torch.cuda.is_available(), 'no GPU'; \
print('TensorRT', tensorrt.__version__, 'on', torch.cuda.get_device_name())"
python -m pytest tests/gpu -v -rs "$@"
