from deepgen.common.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BenchmarkPrompt(_message.Message):
    __slots__ = ("prompt_id", "prompt")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    prompt: str
    def __init__(self, prompt_id: _Optional[str] = ..., prompt: _Optional[str] = ...) -> None: ...

class ListPromptsRequest(_message.Message):
    __slots__ = ("benchmark",)
    BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    benchmark: str
    def __init__(self, benchmark: _Optional[str] = ...) -> None: ...

class ListPromptsResponse(_message.Message):
    __slots__ = ("benchmark", "prompts", "duplicates")
    BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    benchmark: str
    prompts: _containers.RepeatedCompositeFieldContainer[BenchmarkPrompt]
    duplicates: int
    def __init__(self, benchmark: _Optional[str] = ..., prompts: _Optional[_Iterable[_Union[BenchmarkPrompt, _Mapping]]] = ..., duplicates: _Optional[int] = ...) -> None: ...

class StartRunRequest(_message.Message):
    __slots__ = ("step", "benchmark", "duplicates")
    STEP_FIELD_NUMBER: _ClassVar[int]
    BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    step: int
    benchmark: str
    duplicates: int
    def __init__(self, step: _Optional[int] = ..., benchmark: _Optional[str] = ..., duplicates: _Optional[int] = ...) -> None: ...

class StartRunResponse(_message.Message):
    __slots__ = ("run_id", "run_secret")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_SECRET_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    run_secret: str
    def __init__(self, run_id: _Optional[str] = ..., run_secret: _Optional[str] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("prompt_id", "duplicate", "image")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    duplicate: int
    image: _types_pb2.Image
    def __init__(self, prompt_id: _Optional[str] = ..., duplicate: _Optional[int] = ..., image: _Optional[_Union[_types_pb2.Image, _Mapping]] = ...) -> None: ...

class SubmitImagesRequest(_message.Message):
    __slots__ = ("run_id", "images", "run_secret")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    RUN_SECRET_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    images: _containers.RepeatedCompositeFieldContainer[GeneratedImage]
    run_secret: str
    def __init__(self, run_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[GeneratedImage, _Mapping]]] = ..., run_secret: _Optional[str] = ...) -> None: ...

class SubmitImagesResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class FinishRunRequest(_message.Message):
    __slots__ = ("run_id", "run_secret")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_SECRET_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    run_secret: str
    def __init__(self, run_id: _Optional[str] = ..., run_secret: _Optional[str] = ...) -> None: ...

class DimensionScore(_message.Message):
    __slots__ = ("name", "correct", "total", "accuracy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    name: str
    correct: int
    total: int
    accuracy: float
    def __init__(self, name: _Optional[str] = ..., correct: _Optional[int] = ..., total: _Optional[int] = ..., accuracy: _Optional[float] = ...) -> None: ...

class RunSummary(_message.Message):
    __slots__ = ("run_id", "step", "images_judged", "parse_failures", "errors", "sub_dimensions", "primary_dimensions", "overall_accuracy", "primary_mean_accuracy", "answer_rules", "benchmark", "images")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    IMAGES_JUDGED_FIELD_NUMBER: _ClassVar[int]
    PARSE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    SUB_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    OVERALL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_MEAN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ANSWER_RULES_FIELD_NUMBER: _ClassVar[int]
    BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    images_judged: int
    parse_failures: int
    errors: int
    sub_dimensions: _containers.RepeatedCompositeFieldContainer[DimensionScore]
    primary_dimensions: _containers.RepeatedCompositeFieldContainer[DimensionScore]
    overall_accuracy: float
    primary_mean_accuracy: float
    answer_rules: str
    benchmark: str
    images: _containers.RepeatedCompositeFieldContainer[ImageVerdict]
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., images_judged: _Optional[int] = ..., parse_failures: _Optional[int] = ..., errors: _Optional[int] = ..., sub_dimensions: _Optional[_Iterable[_Union[DimensionScore, _Mapping]]] = ..., primary_dimensions: _Optional[_Iterable[_Union[DimensionScore, _Mapping]]] = ..., overall_accuracy: _Optional[float] = ..., primary_mean_accuracy: _Optional[float] = ..., answer_rules: _Optional[str] = ..., benchmark: _Optional[str] = ..., images: _Optional[_Iterable[_Union[ImageVerdict, _Mapping]]] = ...) -> None: ...

class ImageVerdict(_message.Message):
    __slots__ = ("prompt_id", "duplicate", "prompt", "testpoints", "status", "scores", "analysis", "detail")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TESTPOINTS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    duplicate: int
    prompt: str
    testpoints: _containers.RepeatedScalarFieldContainer[str]
    status: str
    scores: _containers.RepeatedScalarFieldContainer[int]
    analysis: str
    detail: str
    def __init__(self, prompt_id: _Optional[str] = ..., duplicate: _Optional[int] = ..., prompt: _Optional[str] = ..., testpoints: _Optional[_Iterable[str]] = ..., status: _Optional[str] = ..., scores: _Optional[_Iterable[int]] = ..., analysis: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...
