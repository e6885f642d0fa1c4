from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProtocolVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_VERSION_UNSPECIFIED: _ClassVar[ProtocolVersion]
    PROTOCOL_VERSION_1: _ClassVar[ProtocolVersion]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_F32: _ClassVar[DType]
    DTYPE_F16: _ClassVar[DType]
    DTYPE_BF16: _ClassVar[DType]
    DTYPE_U8: _ClassVar[DType]
    DTYPE_I8: _ClassVar[DType]
    DTYPE_I16: _ClassVar[DType]
    DTYPE_I32: _ClassVar[DType]
    DTYPE_I64: _ClassVar[DType]
    DTYPE_F8_E4M3: _ClassVar[DType]
    DTYPE_F8_E5M2: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
    DTYPE_F64: _ClassVar[DType]
    DTYPE_U16: _ClassVar[DType]
    DTYPE_U32: _ClassVar[DType]
    DTYPE_U64: _ClassVar[DType]

class Access(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCESS_UNSPECIFIED: _ClassVar[Access]
    ACCESS_READ_ONLY: _ClassVar[Access]
    ACCESS_READ_WRITE: _ClassVar[Access]
PROTOCOL_VERSION_UNSPECIFIED: ProtocolVersion
PROTOCOL_VERSION_1: ProtocolVersion
DTYPE_UNSPECIFIED: DType
DTYPE_F32: DType
DTYPE_F16: DType
DTYPE_BF16: DType
DTYPE_U8: DType
DTYPE_I8: DType
DTYPE_I16: DType
DTYPE_I32: DType
DTYPE_I64: DType
DTYPE_F8_E4M3: DType
DTYPE_F8_E5M2: DType
DTYPE_BOOL: DType
DTYPE_F64: DType
DTYPE_U16: DType
DTYPE_U32: DType
DTYPE_U64: DType
ACCESS_UNSPECIFIED: Access
ACCESS_READ_ONLY: Access
ACCESS_READ_WRITE: Access

class CPUSegment(_message.Message):
    __slots__ = ("id", "path", "size", "host_pid")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    HOST_PID_FIELD_NUMBER: _ClassVar[int]
    id: int
    path: str
    size: int
    host_pid: int
    def __init__(self, id: _Optional[int] = ..., path: _Optional[str] = ..., size: _Optional[int] = ..., host_pid: _Optional[int] = ...) -> None: ...

class CUDASlab(_message.Message):
    __slots__ = ("id", "ipc_handle", "size", "device", "host_pid")
    ID_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOST_PID_FIELD_NUMBER: _ClassVar[int]
    id: int
    ipc_handle: bytes
    size: int
    device: int
    host_pid: int
    def __init__(self, id: _Optional[int] = ..., ipc_handle: _Optional[bytes] = ..., size: _Optional[int] = ..., device: _Optional[int] = ..., host_pid: _Optional[int] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("cpu", "cuda", "offset", "length", "generation")
    CPU_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    cpu: CPUSegment
    cuda: CUDASlab
    offset: int
    length: int
    generation: int
    def __init__(self, cpu: _Optional[_Union[CPUSegment, _Mapping]] = ..., cuda: _Optional[_Union[CUDASlab, _Mapping]] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class TensorRef(_message.Message):
    __slots__ = ("dtype", "shape", "region")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    region: Region
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., region: _Optional[_Union[Region, _Mapping]] = ...) -> None: ...

class QuantInfo(_message.Message):
    __slots__ = ("quant_type", "blocksize", "dtype", "shape", "nested", "nested_blocksize", "nested_offset", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "storage_dtype")
    QUANT_TYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCKSIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NESTED_FIELD_NUMBER: _ClassVar[int]
    NESTED_BLOCKSIZE_FIELD_NUMBER: _ClassVar[int]
    NESTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    ABSMAX_FIELD_NUMBER: _ClassVar[int]
    QUANT_MAP_FIELD_NUMBER: _ClassVar[int]
    NESTED_ABSMAX_FIELD_NUMBER: _ClassVar[int]
    NESTED_QUANT_MAP_FIELD_NUMBER: _ClassVar[int]
    STORAGE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    quant_type: str
    blocksize: int
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    nested: bool
    nested_blocksize: int
    nested_offset: float
    absmax: TensorRef
    quant_map: TensorRef
    nested_absmax: TensorRef
    nested_quant_map: TensorRef
    storage_dtype: DType
    def __init__(self, quant_type: _Optional[str] = ..., blocksize: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., nested: _Optional[bool] = ..., nested_blocksize: _Optional[int] = ..., nested_offset: _Optional[float] = ..., absmax: _Optional[_Union[TensorRef, _Mapping]] = ..., quant_map: _Optional[_Union[TensorRef, _Mapping]] = ..., nested_absmax: _Optional[_Union[TensorRef, _Mapping]] = ..., nested_quant_map: _Optional[_Union[TensorRef, _Mapping]] = ..., storage_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class TensorDescriptor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes", "access", "region", "quant", "model")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    access: Access
    region: Region
    quant: QuantInfo
    model: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., access: _Optional[_Union[Access, str]] = ..., region: _Optional[_Union[Region, _Mapping]] = ..., quant: _Optional[_Union[QuantInfo, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("host_broker_id",)
    HOST_BROKER_ID_FIELD_NUMBER: _ClassVar[int]
    host_broker_id: int
    def __init__(self, host_broker_id: _Optional[int] = ...) -> None: ...

class MethodInfo(_message.Message):
    __slots__ = ("name", "description", "streaming")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    STREAMING_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    streaming: bool
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., streaming: _Optional[bool] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("name", "version", "protocol_version", "kind", "methods", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    protocol_version: int
    kind: str
    methods: _containers.RepeatedCompositeFieldContainer[MethodInfo]
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., kind: _Optional[str] = ..., methods: _Optional[_Iterable[_Union[MethodInfo, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class InvokeRequest(_message.Message):
    __slots__ = ("method", "args", "tensors", "call_id")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    method: str
    args: bytes
    tensors: _containers.RepeatedCompositeFieldContainer[TensorDescriptor]
    call_id: str
    def __init__(self, method: _Optional[str] = ..., args: _Optional[bytes] = ..., tensors: _Optional[_Iterable[_Union[TensorDescriptor, _Mapping]]] = ..., call_id: _Optional[str] = ...) -> None: ...

class InvokeResponse(_message.Message):
    __slots__ = ("result", "tensors")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    result: bytes
    tensors: _containers.RepeatedCompositeFieldContainer[TensorDescriptor]
    def __init__(self, result: _Optional[bytes] = ..., tensors: _Optional[_Iterable[_Union[TensorDescriptor, _Mapping]]] = ...) -> None: ...

class AllocateRequest(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class AllocateResponse(_message.Message):
    __slots__ = ("tensor",)
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    tensor: TensorDescriptor
    def __init__(self, tensor: _Optional[_Union[TensorDescriptor, _Mapping]] = ...) -> None: ...

class FreeRequest(_message.Message):
    __slots__ = ("regions",)
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    def __init__(self, regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ...) -> None: ...

class FreeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LookupTensorsRequest(_message.Message):
    __slots__ = ("model", "names", "prefix", "include_factors")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FACTORS_FIELD_NUMBER: _ClassVar[int]
    model: str
    names: _containers.RepeatedScalarFieldContainer[str]
    prefix: str
    include_factors: bool
    def __init__(self, model: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., prefix: _Optional[str] = ..., include_factors: _Optional[bool] = ...) -> None: ...

class LayerFactors(_message.Message):
    __slots__ = ("layer", "a", "b", "binding_generation")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    BINDING_GENERATION_FIELD_NUMBER: _ClassVar[int]
    layer: str
    a: TensorDescriptor
    b: TensorDescriptor
    binding_generation: int
    def __init__(self, layer: _Optional[str] = ..., a: _Optional[_Union[TensorDescriptor, _Mapping]] = ..., b: _Optional[_Union[TensorDescriptor, _Mapping]] = ..., binding_generation: _Optional[int] = ...) -> None: ...

class LookupTensorsResponse(_message.Message):
    __slots__ = ("tensors", "factors")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorDescriptor]
    factors: _containers.RepeatedCompositeFieldContainer[LayerFactors]
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorDescriptor, _Mapping]]] = ..., factors: _Optional[_Iterable[_Union[LayerFactors, _Mapping]]] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("job_id", "topic", "step", "total", "payload", "tensors")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    topic: str
    step: int
    total: int
    payload: bytes
    tensors: _containers.RepeatedCompositeFieldContainer[TensorDescriptor]
    def __init__(self, job_id: _Optional[str] = ..., topic: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., payload: _Optional[bytes] = ..., tensors: _Optional[_Iterable[_Union[TensorDescriptor, _Mapping]]] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class LogRequest(_message.Message):
    __slots__ = ("level", "message", "attrs")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    level: str
    message: str
    attrs: _containers.ScalarMap[str, str]
    def __init__(self, level: _Optional[str] = ..., message: _Optional[str] = ..., attrs: _Optional[_Mapping[str, str]] = ...) -> None: ...

class LogResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
