"""Shared TensorRT stand-ins for the GPU-free TensorRT tests: crafted plans, the example sidecar, a FAKE ``tensorrt``.

``fake_tensorrt`` is a stand-in module exposing the few attributes mmexport uses, for major
10 and 11; its engine-inspector JSON comes from tests/data/trt_inspector (see its README for
provenance). Used by tests/convert/test_tensorrt_builder.py, tests/runtime/test_engine.py and
tests/runtime/test_tensorrt_runner.py.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import types
from pathlib import Path

import numpy as np

from mmexport.runtime.engine import (
    BuildFlags,
    EngineEnvironment,
    EngineSidecar,
    sidecar_path,
)

DATA = Path(__file__).parent / "data"
INSPECTOR = DATA / "trt_inspector"
H100 = EngineEnvironment("10.16.1.11", 13000, 13000, "NVIDIA H100 80GB HBM3", (9, 0))


def plan_bytes(version=(10, 16, 1, 11), layout=0, archive=239, payload=b"engine weights and kernels") -> bytes:
    return b"ftrt" + struct.pack("<II", layout, archive) + bytes(12) + bytes(version) + payload


def make_sidecar(**changes) -> EngineSidecar:
    base = EngineSidecar.from_json((DATA / "engine" / "model.fp16.plan.json").read_text())
    flags = changes.pop("build_flags", None)
    if flags:
        changes["build_flags"] = BuildFlags(**{**base.build_flags.__dict__, **flags})
    return EngineSidecar(**{**base.__dict__, **changes})


def write_engine(tmp_path, data=None, **changes) -> Path:
    """A crafted plan and a matching sidecar (the example's, with ``changes``) in ``tmp_path``."""
    data = plan_bytes() if data is None else data
    path = tmp_path / "model.fp16.plan"
    path.write_bytes(data)
    sidecar = make_sidecar(engine_sha256=hashlib.sha256(data).hexdigest(), **changes)
    sidecar_path(path).write_text(sidecar.to_json())
    return path


# ------------------------------------------------------------------------------------------------
# the fake tensorrt module
# ------------------------------------------------------------------------------------------------
def fake_tensorrt(version: str = "10.16.1.11", **behaviour) -> types.ModuleType:
    """A stand-in ``tensorrt`` exposing what mmexport uses; major 10 keeps the deprecated members, 11 drops them."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.behaviour = {
        "parse_ok": True, "parser_errors": [], "build_ok": True, "plan": plan_bytes(tuple(int(p) for p in version.split("."))),
        "inspector": (INSPECTOR / "trt10_layout_resnet_fp16.json").read_text(), "deserialize_ok": True, "combine_ok": True,
        "input": ("image", (-1, 3, 64, 64)),
    }
    trt.behaviour.update(behaviour)
    trt.log = []
    if major == 10:
        trt.NetworkDefinitionCreationFlag = enum.IntEnum(
            "NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
        )
        flags = ["FP16", "BF16", "INT8", "TF32", "VERSION_COMPATIBLE", "OBEY_PRECISION_CONSTRAINTS"]
    else:
        trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0})
        flags = ["TF32", "VERSION_COMPATIBLE"]
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", ["WORKSPACE"])
    trt.HardwareCompatibilityLevel = enum.IntEnum(
        "HardwareCompatibilityLevel", ["NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"]
    )
    trt.ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", ["LAYER_NAMES_ONLY", "DETAILED", "NONE"])
    trt.LayerInformationFormat = enum.IntEnum("LayerInformationFormat", ["ONELINE", "JSON"])
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    trt.DataType = enum.IntEnum("DataType", ["FLOAT", "HALF", "BF16"])
    trt.nptype = lambda t: {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16}[t] if t != trt.DataType.BF16 else (
        _ for _ in ()).throw(TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype."))

    class ILogger:
        Severity = enum.IntEnum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])

        def __init__(self):
            pass

    trt.ILogger = ILogger
    b = trt.behaviour

    class Cache:
        def __init__(self, data: bytes):
            if data.startswith(b"corrupt"):
                raise RuntimeError("timing cache is corrupt")
            self.entries = set(filter(None, data.decode().split(",")))

        def combine(self, other, ignore_mismatch):
            trt.log.append(("combine", sorted(other.entries), ignore_mismatch))
            if b["combine_ok"]:
                self.entries |= other.entries
            return b["combine_ok"]

        def serialize(self):
            return ",".join(sorted(self.entries)).encode()

    class Config:
        def __init__(self):
            self.cache = None

        def set_flag(self, flag):
            trt.log.append(("set_flag", flag.name))

        def clear_flag(self, flag):
            trt.log.append(("clear_flag", flag.name))

        def set_memory_pool_limit(self, pool, size):
            trt.log.append(("pool", pool.name, size))

        def __setattr__(self, name, value):
            if name != "cache":
                trt.log.append(("config", name, getattr(value, "name", value)))
            object.__setattr__(self, name, value)

        def create_timing_cache(self, data):
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            trt.log.append(("set_timing_cache", sorted(cache.entries), ignore_mismatch))
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            trt.log.append(("profile", profile.shapes))
            return 0

    class Profile:
        def set_shape(self, name, low, opt, high):
            self.shapes = (name, tuple(low), tuple(opt), tuple(high))

    class Network:
        def __init__(self, flags):
            self.flags = flags
            name, shape = b["input"]
            self.inputs = [types.SimpleNamespace(name=name, shape=shape)]

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, index):
            return self.inputs[index]

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            trt.log.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if config.cache is not None:
                config.cache.entries.add(f"tactic-{len(trt.log)}")
            if not b["build_ok"]:
                self.logger.log(ILogger.Severity.ERROR, "[network.cpp::validate] Error Code 4: out of   memory")
                return None
            return memoryview(b["plan"])

    class ParserError:
        def __init__(self, node, name, op, desc):
            self._values = (node, name, op, desc)

        def node(self):
            return self._values[0]

        def node_name(self):
            return self._values[1]

        def node_operator(self):
            return self._values[2]

        def desc(self):
            return self._values[3]

    class OnnxParser:
        def __init__(self, network, logger):
            self.errors = [ParserError(*e) for e in b["parser_errors"]]

        def parse_from_file(self, path):
            trt.log.append(("parse", Path(path).name))
            return b["parse_ok"]

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, index):
            return self.errors[index]

    class Engine:
        def create_engine_inspector(self):
            return types.SimpleNamespace(get_engine_information=lambda fmt: (trt.log.append(("inspect", fmt.name)),
                                                                             b["inspector"])[1])

    class Runtime:
        def __init__(self, logger):
            self.logger = logger
            self.engine_host_code_allowed = False
            trt.runtimes.append(self)

        def deserialize_cuda_engine(self, data):
            trt.log.append(("deserialize", len(bytes(data))))
            if not b["deserialize_ok"]:
                self.logger.log(ILogger.Severity.ERROR, "The engine plan file is generated on an incompatible device, "
                                                        "expecting compute 8.9 got compute 9.0, please rebuild.")
                return None
            return b.get("engine") or Engine()

    trt.runtimes = []
    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt
