"""A Runner over a TensorRT engine: device buffers are torch CUDA tensors; the KV cache stays on the GPU.

One execution context per optimization profile (prefill, decode); each step picks its profile
from the shapes (profiles.select_profile). The cache is the engine's `present` tensors, in the
engine's own type (half for fp16/bf16 builds); `cache_arrays` reads it back as float32.
"""

from __future__ import annotations

import numpy as np

from gptkiln.exporter import io_spec
from gptkiln.models.spec import DecoderSpec
from gptkiln.targets.base import Runner
from gptkiln.targets.tensorrt.profiles import Profile, select_profile


class TensorRTRunner(Runner):
    def __init__(self, spec: DecoderSpec, engine, profiles: list[Profile]):
        import tensorrt as trt
        import torch

        super().__init__(spec)
        self.torch = torch
        self.engine, self.profiles = engine, profiles
        self.stream = torch.cuda.Stream()
        self.contexts = []
        for index in range(len(profiles)):
            context = engine.create_execution_context()
            context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.contexts.append(context)
        self.stream.synchronize()
        types = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                 trt.DataType.BF16: torch.bfloat16, trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.dtypes = {name: types[engine.get_tensor_dtype(name)] for name in names}
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.past_names = io_spec.past_names(spec.num_layers)
        self.present_names = io_spec.present_names(spec.num_layers)
        self.placeholder = torch.empty(256, dtype=torch.uint8, device="cuda")  # address for zero-size tensors

    def empty_cache(self, batch: int, capacity: int = 0):
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_dim)
        return [self.torch.zeros(shape, dtype=self.dtypes[name], device="cuda") for name in self.past_names]

    def cache_arrays(self, cache) -> list[np.ndarray]:
        return [tensor.float().cpu().numpy() for tensor in cache]

    def step(self, input_ids, attention_mask, position_ids, cache, last_only: bool = False):
        torch = self.torch
        batch, sequence = input_ids.shape
        context = self.contexts[select_profile(self.profiles, batch, sequence, cache[0].shape[2])]
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feeds = {name: torch.from_numpy(np.ascontiguousarray(array)).to("cuda") for name, array in feeds.items()}
        feeds.update((name, tensor.contiguous()) for name, tensor in zip(self.past_names, cache))
        for name, tensor in feeds.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise RuntimeError(f"TensorRT refused the shape {tuple(tensor.shape)} for '{name}'")
            context.set_tensor_address(name, self._address(tensor))
        unresolved = context.infer_shapes()
        if unresolved:
            raise RuntimeError(f"TensorRT cannot infer the shapes of {unresolved}")
        results = {name: torch.empty(tuple(context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
                   for name in self.outputs}
        for name, tensor in results.items():
            context.set_tensor_address(name, self._address(tensor))
        self.stream.wait_stream(torch.cuda.current_stream())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT could not enqueue the step")
        self.stream.synchronize()
        logits = results["logits"].float().cpu().numpy()
        return logits, [results[name] for name in self.present_names]

    def _address(self, tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self.placeholder.data_ptr()
