from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdsContext(_message.Message):
    __slots__ = ("device", "hour")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOUR_FIELD_NUMBER: _ClassVar[int]
    device: str
    hour: int
    def __init__(self, device: _Optional[str] = ..., hour: _Optional[int] = ...) -> None: ...

class AdsRequest(_message.Message):
    __slots__ = ("request_id", "user_id", "scene", "slots", "context", "budget_ms", "debug")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SCENE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: str
    scene: str
    slots: int
    context: AdsContext
    budget_ms: float
    debug: bool
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., scene: _Optional[str] = ..., slots: _Optional[int] = ..., context: _Optional[_Union[AdsContext, _Mapping]] = ..., budget_ms: _Optional[float] = ..., debug: _Optional[bool] = ...) -> None: ...

class AdSlot(_message.Message):
    __slots__ = ("position", "ad_id", "campaign_id", "creative_id", "price_micros", "pctr", "pcvr", "ecpm", "token")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    AD_ID_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_ID_FIELD_NUMBER: _ClassVar[int]
    CREATIVE_ID_FIELD_NUMBER: _ClassVar[int]
    PRICE_MICROS_FIELD_NUMBER: _ClassVar[int]
    PCTR_FIELD_NUMBER: _ClassVar[int]
    PCVR_FIELD_NUMBER: _ClassVar[int]
    ECPM_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    position: int
    ad_id: int
    campaign_id: int
    creative_id: str
    price_micros: int
    pctr: float
    pcvr: float
    ecpm: float
    token: str
    def __init__(self, position: _Optional[int] = ..., ad_id: _Optional[int] = ..., campaign_id: _Optional[int] = ..., creative_id: _Optional[str] = ..., price_micros: _Optional[int] = ..., pctr: _Optional[float] = ..., pcvr: _Optional[float] = ..., ecpm: _Optional[float] = ..., token: _Optional[str] = ...) -> None: ...

class StageReport(_message.Message):
    __slots__ = ("name", "count_in", "count_out", "ms", "degraded", "reason", "dropped")
    class DroppedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_IN_FIELD_NUMBER: _ClassVar[int]
    COUNT_OUT_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    name: str
    count_in: int
    count_out: int
    ms: float
    degraded: bool
    reason: str
    dropped: _containers.ScalarMap[str, int]
    def __init__(self, name: _Optional[str] = ..., count_in: _Optional[int] = ..., count_out: _Optional[int] = ..., ms: _Optional[float] = ..., degraded: _Optional[bool] = ..., reason: _Optional[str] = ..., dropped: _Optional[_Mapping[str, int]] = ...) -> None: ...

class DebugCandidate(_message.Message):
    __slots__ = ("ad_id", "score", "channel")
    AD_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    ad_id: int
    score: float
    channel: str
    def __init__(self, ad_id: _Optional[int] = ..., score: _Optional[float] = ..., channel: _Optional[str] = ...) -> None: ...

class DebugStage(_message.Message):
    __slots__ = ("name", "candidates")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    name: str
    candidates: _containers.RepeatedCompositeFieldContainer[DebugCandidate]
    def __init__(self, name: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[DebugCandidate, _Mapping]]] = ...) -> None: ...

class AdsResponse(_message.Message):
    __slots__ = ("request_id", "slots", "stages", "degraded", "model_version", "debug")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    slots: _containers.RepeatedCompositeFieldContainer[AdSlot]
    stages: _containers.RepeatedCompositeFieldContainer[StageReport]
    degraded: bool
    model_version: str
    debug: _containers.RepeatedCompositeFieldContainer[DebugStage]
    def __init__(self, request_id: _Optional[str] = ..., slots: _Optional[_Iterable[_Union[AdSlot, _Mapping]]] = ..., stages: _Optional[_Iterable[_Union[StageReport, _Mapping]]] = ..., degraded: _Optional[bool] = ..., model_version: _Optional[str] = ..., debug: _Optional[_Iterable[_Union[DebugStage, _Mapping]]] = ...) -> None: ...

class EventRequest(_message.Message):
    __slots__ = ("event_id", "token", "type")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    token: str
    type: str
    def __init__(self, event_id: _Optional[str] = ..., token: _Optional[str] = ..., type: _Optional[str] = ...) -> None: ...

class EventResponse(_message.Message):
    __slots__ = ("event_id", "accepted", "duplicate")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    accepted: bool
    duplicate: bool
    def __init__(self, event_id: _Optional[str] = ..., accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ...) -> None: ...
