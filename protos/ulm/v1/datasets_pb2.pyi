from protos.ulm.v1 import jobs_pb2 as _jobs_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DatasetSource(_message.Message):
    __slots__ = ("file", "corpus", "local_copy")
    FILE_FIELD_NUMBER: _ClassVar[int]
    CORPUS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_COPY_FIELD_NUMBER: _ClassVar[int]
    file: str
    corpus: str
    local_copy: str
    def __init__(self, file: _Optional[str] = ..., corpus: _Optional[str] = ..., local_copy: _Optional[str] = ...) -> None: ...

class CreateDatasetRequest(_message.Message):
    __slots__ = ("name", "sources", "jsonl_field", "tokenizer", "vocab_size", "val_fraction", "test_fraction", "text_unit", "normalization", "no_whitespace_cleanup", "no_dedup", "min_chars", "shuffle_seed", "overwrite")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    JSONL_FIELD_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    VAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TEST_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TEXT_UNIT_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    NO_WHITESPACE_CLEANUP_FIELD_NUMBER: _ClassVar[int]
    NO_DEDUP_FIELD_NUMBER: _ClassVar[int]
    MIN_CHARS_FIELD_NUMBER: _ClassVar[int]
    SHUFFLE_SEED_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    name: str
    sources: _containers.RepeatedCompositeFieldContainer[DatasetSource]
    jsonl_field: str
    tokenizer: str
    vocab_size: int
    val_fraction: float
    test_fraction: float
    text_unit: str
    normalization: str
    no_whitespace_cleanup: bool
    no_dedup: bool
    min_chars: int
    shuffle_seed: int
    overwrite: bool
    def __init__(self, name: _Optional[str] = ..., sources: _Optional[_Iterable[_Union[DatasetSource, _Mapping]]] = ..., jsonl_field: _Optional[str] = ..., tokenizer: _Optional[str] = ..., vocab_size: _Optional[int] = ..., val_fraction: _Optional[float] = ..., test_fraction: _Optional[float] = ..., text_unit: _Optional[str] = ..., normalization: _Optional[str] = ..., no_whitespace_cleanup: _Optional[bool] = ..., no_dedup: _Optional[bool] = ..., min_chars: _Optional[int] = ..., shuffle_seed: _Optional[int] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class SplitInfo(_message.Message):
    __slots__ = ("name", "num_tokens", "num_documents", "dtype", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_tokens: int
    num_documents: int
    dtype: str
    sha256: str
    def __init__(self, name: _Optional[str] = ..., num_tokens: _Optional[int] = ..., num_documents: _Optional[int] = ..., dtype: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("name", "id", "tokenizer", "vocab_size", "splits", "manifest_json", "job", "created_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    id: str
    tokenizer: str
    vocab_size: int
    splits: _containers.RepeatedCompositeFieldContainer[SplitInfo]
    manifest_json: str
    job: str
    created_at: float
    def __init__(self, name: _Optional[str] = ..., id: _Optional[str] = ..., tokenizer: _Optional[str] = ..., vocab_size: _Optional[int] = ..., splits: _Optional[_Iterable[_Union[SplitInfo, _Mapping]]] = ..., manifest_json: _Optional[str] = ..., job: _Optional[str] = ..., created_at: _Optional[float] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ...) -> None: ...

class GetDatasetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteDatasetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
