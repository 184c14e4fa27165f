from protos.ulm.v1 import text_generation_pb2 as _text_generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_FORMAT_UNSPECIFIED: _ClassVar[ModelFormat]
    MODEL_FORMAT_CHECKPOINT: _ClassVar[ModelFormat]
    MODEL_FORMAT_ONNX: _ClassVar[ModelFormat]
MODEL_FORMAT_UNSPECIFIED: ModelFormat
MODEL_FORMAT_CHECKPOINT: ModelFormat
MODEL_FORMAT_ONNX: ModelFormat

class Model(_message.Message):
    __slots__ = ("name", "format", "quantization", "parameter_count", "size_bytes", "config_json", "dataset", "dataset_id", "training_job", "source_model", "best_val_loss", "export_report_json", "loaded", "created_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_JOB_FIELD_NUMBER: _ClassVar[int]
    SOURCE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BEST_VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EXPORT_REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: ModelFormat
    quantization: str
    parameter_count: int
    size_bytes: int
    config_json: str
    dataset: str
    dataset_id: str
    training_job: str
    source_model: str
    best_val_loss: float
    export_report_json: str
    loaded: bool
    created_at: float
    def __init__(self, name: _Optional[str] = ..., format: _Optional[_Union[ModelFormat, str]] = ..., quantization: _Optional[str] = ..., parameter_count: _Optional[int] = ..., size_bytes: _Optional[int] = ..., config_json: _Optional[str] = ..., dataset: _Optional[str] = ..., dataset_id: _Optional[str] = ..., training_job: _Optional[str] = ..., source_model: _Optional[str] = ..., best_val_loss: _Optional[float] = ..., export_report_json: _Optional[str] = ..., loaded: _Optional[bool] = ..., created_at: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name", "backend", "device", "max_batch")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    backend: str
    device: str
    max_batch: int
    def __init__(self, name: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., max_batch: _Optional[int] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name", "timeout_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    timeout_s: float
    def __init__(self, name: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLoadedModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLoadedModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_text_generation_pb2.ModelInfo]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[_text_generation_pb2.ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
