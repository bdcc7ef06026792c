"""The TensorRT target: readiness check, profiles and compatibility run anywhere; building and running need TensorRT."""

from gptkiln.targets.tensorrt.target import TensorRTTarget

__all__ = ["TensorRTTarget"]
