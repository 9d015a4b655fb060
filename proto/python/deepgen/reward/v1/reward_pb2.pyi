from deepgen.common.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoringMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORING_MODE_UNSPECIFIED: _ClassVar[ScoringMode]
    SCORING_MODE_POINTWISE: _ClassVar[ScoringMode]
    SCORING_MODE_GROUP: _ClassVar[ScoringMode]

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_OK: _ClassVar[Outcome]
    OUTCOME_NOT_APPLICABLE: _ClassVar[Outcome]
    OUTCOME_ERROR: _ClassVar[Outcome]
SCORING_MODE_UNSPECIFIED: ScoringMode
SCORING_MODE_POINTWISE: ScoringMode
SCORING_MODE_GROUP: ScoringMode
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_OK: Outcome
OUTCOME_NOT_APPLICABLE: Outcome
OUTCOME_ERROR: Outcome

class Sample(_message.Message):
    __slots__ = ("image", "prompt", "group_id", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    image: _types_pb2.Image
    prompt: str
    group_id: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, image: _Optional[_Union[_types_pb2.Image, _Mapping]] = ..., prompt: _Optional[str] = ..., group_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("samples", "mode")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    mode: ScoringMode
    def __init__(self, samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., mode: _Optional[_Union[ScoringMode, str]] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("outcome", "score", "error", "details")
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    outcome: Outcome
    score: float
    error: str
    details: _containers.ScalarMap[str, str]
    def __init__(self, outcome: _Optional[_Union[Outcome, str]] = ..., score: _Optional[float] = ..., error: _Optional[str] = ..., details: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ...) -> None: ...
