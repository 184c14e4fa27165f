from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_KIND_UNSPECIFIED: _ClassVar[JobKind]
    JOB_KIND_DATASET: _ClassVar[JobKind]
    JOB_KIND_TRAINING: _ClassVar[JobKind]
    JOB_KIND_EXPORT: _ClassVar[JobKind]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
    JOB_STATE_INTERRUPTED: _ClassVar[JobState]
JOB_KIND_UNSPECIFIED: JobKind
JOB_KIND_DATASET: JobKind
JOB_KIND_TRAINING: JobKind
JOB_KIND_EXPORT: JobKind
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
JOB_STATE_INTERRUPTED: JobState

class JobProgress(_message.Message):
    __slots__ = ("step", "total", "loss", "val_loss", "learning_rate", "tokens_per_s", "eta_s", "fraction")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    loss: float
    val_loss: float
    learning_rate: float
    tokens_per_s: float
    eta_s: float
    fraction: float
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., loss: _Optional[float] = ..., val_loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., eta_s: _Optional[float] = ..., fraction: _Optional[float] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("name", "id", "kind", "state", "spec_json", "progress", "result", "error", "created_at", "started_at", "ended_at", "last_sequence", "attempts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    id: str
    kind: JobKind
    state: JobState
    spec_json: str
    progress: JobProgress
    result: str
    error: str
    created_at: float
    started_at: float
    ended_at: float
    last_sequence: int
    attempts: int
    def __init__(self, name: _Optional[str] = ..., id: _Optional[str] = ..., kind: _Optional[_Union[JobKind, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., spec_json: _Optional[str] = ..., progress: _Optional[_Union[JobProgress, _Mapping]] = ..., result: _Optional[str] = ..., error: _Optional[str] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., ended_at: _Optional[float] = ..., last_sequence: _Optional[int] = ..., attempts: _Optional[int] = ...) -> None: ...

class StartTrainingRequest(_message.Message):
    __slots__ = ("dataset", "recipe", "overrides", "seed", "model", "nproc", "resume_from")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NPROC_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    recipe: str
    overrides: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    model: str
    nproc: int
    resume_from: str
    def __init__(self, dataset: _Optional[str] = ..., recipe: _Optional[str] = ..., overrides: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., model: _Optional[str] = ..., nproc: _Optional[int] = ..., resume_from: _Optional[str] = ...) -> None: ...

class StartExportRequest(_message.Message):
    __slots__ = ("model", "quantize", "name")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    model: str
    quantize: str
    name: str
    def __init__(self, model: _Optional[str] = ..., quantize: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("kind", "state", "page_size", "page_token")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    kind: JobKind
    state: JobState
    page_size: int
    page_token: str
    def __init__(self, kind: _Optional[_Union[JobKind, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ResumeJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("name", "since_sequence", "replay_all")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SINCE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REPLAY_ALL_FIELD_NUMBER: _ClassVar[int]
    name: str
    since_sequence: int
    replay_all: bool
    def __init__(self, name: _Optional[str] = ..., since_sequence: _Optional[int] = ..., replay_all: _Optional[bool] = ...) -> None: ...

class StepEvent(_message.Message):
    __slots__ = ("step", "loss", "learning_rate", "tokens_per_s", "eta_s")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    learning_rate: float
    tokens_per_s: float
    eta_s: float
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., eta_s: _Optional[float] = ...) -> None: ...

class EvalEvent(_message.Message):
    __slots__ = ("step", "val_loss", "val_perplexity", "val_accuracy")
    STEP_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    step: int
    val_loss: float
    val_perplexity: float
    val_accuracy: float
    def __init__(self, step: _Optional[int] = ..., val_loss: _Optional[float] = ..., val_perplexity: _Optional[float] = ..., val_accuracy: _Optional[float] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("sequence", "time", "job", "step", "eval", "log")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: float
    job: Job
    step: StepEvent
    eval: EvalEvent
    log: str
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[float] = ..., job: _Optional[_Union[Job, _Mapping]] = ..., step: _Optional[_Union[StepEvent, _Mapping]] = ..., eval: _Optional[_Union[EvalEvent, _Mapping]] = ..., log: _Optional[str] = ...) -> None: ...
