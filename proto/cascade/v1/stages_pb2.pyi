from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scalar(_message.Message):
    __slots__ = ("int_value", "float_value", "string_value")
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    int_value: int
    float_value: float
    string_value: str
    def __init__(self, int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., string_value: _Optional[str] = ...) -> None: ...

class Column(_message.Message):
    __slots__ = ("ints", "strs", "floats")
    INTS_FIELD_NUMBER: _ClassVar[int]
    STRS_FIELD_NUMBER: _ClassVar[int]
    FLOATS_FIELD_NUMBER: _ClassVar[int]
    ints: bytes
    strs: _containers.RepeatedScalarFieldContainer[str]
    floats: bytes
    def __init__(self, ints: _Optional[bytes] = ..., strs: _Optional[_Iterable[str]] = ..., floats: _Optional[bytes] = ...) -> None: ...

class Eligibility(_message.Message):
    __slots__ = ("exclude_ad_ids", "include_paused", "ignore_scene_targeting")
    EXCLUDE_AD_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PAUSED_FIELD_NUMBER: _ClassVar[int]
    IGNORE_SCENE_TARGETING_FIELD_NUMBER: _ClassVar[int]
    exclude_ad_ids: bytes
    include_paused: bool
    ignore_scene_targeting: bool
    def __init__(self, exclude_ad_ids: _Optional[bytes] = ..., include_paused: _Optional[bool] = ..., ignore_scene_targeting: _Optional[bool] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("model_version", "queue_ms", "compute_ms", "partial")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    queue_ms: float
    compute_ms: float
    partial: bool
    def __init__(self, model_version: _Optional[str] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., partial: _Optional[bool] = ...) -> None: ...

class RecallRequest(_message.Message):
    __slots__ = ("request_id", "user_id", "scene", "k", "user_vector", "user", "hist", "context", "eligibility", "debug", "quotas", "model_version")
    class UserEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Scalar
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Scalar, _Mapping]] = ...) -> None: ...
    class HistEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Column
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Column, _Mapping]] = ...) -> None: ...
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Scalar
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Scalar, _Mapping]] = ...) -> None: ...
    class QuotasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SCENE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    USER_VECTOR_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    HIST_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ELIGIBILITY_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: str
    scene: str
    k: int
    user_vector: bytes
    user: _containers.MessageMap[str, Scalar]
    hist: _containers.MessageMap[str, Column]
    context: _containers.MessageMap[str, Scalar]
    eligibility: Eligibility
    debug: bool
    quotas: _containers.ScalarMap[str, float]
    model_version: str
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., scene: _Optional[str] = ..., k: _Optional[int] = ..., user_vector: _Optional[bytes] = ..., user: _Optional[_Mapping[str, Scalar]] = ..., hist: _Optional[_Mapping[str, Column]] = ..., context: _Optional[_Mapping[str, Scalar]] = ..., eligibility: _Optional[_Union[Eligibility, _Mapping]] = ..., debug: _Optional[bool] = ..., quotas: _Optional[_Mapping[str, float]] = ..., model_version: _Optional[str] = ...) -> None: ...

class RecallResponse(_message.Message):
    __slots__ = ("ad_ids", "scores", "channel", "eligible", "info", "channels", "channel_names")
    AD_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    ad_ids: bytes
    scores: bytes
    channel: str
    eligible: int
    info: StageInfo
    channels: bytes
    channel_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ad_ids: _Optional[bytes] = ..., scores: _Optional[bytes] = ..., channel: _Optional[str] = ..., eligible: _Optional[int] = ..., info: _Optional[_Union[StageInfo, _Mapping]] = ..., channels: _Optional[bytes] = ..., channel_names: _Optional[_Iterable[str]] = ...) -> None: ...

class PrerankRequest(_message.Message):
    __slots__ = ("request_id", "user_id", "scene", "k", "user", "hist", "context", "ad_ids", "values", "model_version")
    class UserEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Scalar
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Scalar, _Mapping]] = ...) -> None: ...
    class HistEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Column
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Column, _Mapping]] = ...) -> None: ...
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Scalar
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Scalar, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SCENE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    HIST_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    AD_IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: str
    scene: str
    k: int
    user: _containers.MessageMap[str, Scalar]
    hist: _containers.MessageMap[str, Column]
    context: _containers.MessageMap[str, Scalar]
    ad_ids: bytes
    values: bytes
    model_version: str
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., scene: _Optional[str] = ..., k: _Optional[int] = ..., user: _Optional[_Mapping[str, Scalar]] = ..., hist: _Optional[_Mapping[str, Column]] = ..., context: _Optional[_Mapping[str, Scalar]] = ..., ad_ids: _Optional[bytes] = ..., values: _Optional[bytes] = ..., model_version: _Optional[str] = ...) -> None: ...

class PrerankResponse(_message.Message):
    __slots__ = ("ad_ids", "scores", "info")
    AD_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    ad_ids: bytes
    scores: bytes
    info: StageInfo
    def __init__(self, ad_ids: _Optional[bytes] = ..., scores: _Optional[bytes] = ..., info: _Optional[_Union[StageInfo, _Mapping]] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("request_id", "user_id", "scene", "user", "hist", "context", "ad_ids", "ad_features", "model_version")
    class UserEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Scalar
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Scalar, _Mapping]] = ...) -> None: ...
    class HistEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Column
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Column, _Mapping]] = ...) -> None: ...
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Scalar
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Scalar, _Mapping]] = ...) -> None: ...
    class AdFeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Column
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Column, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SCENE_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    HIST_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    AD_IDS_FIELD_NUMBER: _ClassVar[int]
    AD_FEATURES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: str
    scene: str
    user: _containers.MessageMap[str, Scalar]
    hist: _containers.MessageMap[str, Column]
    context: _containers.MessageMap[str, Scalar]
    ad_ids: bytes
    ad_features: _containers.MessageMap[str, Column]
    model_version: str
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., scene: _Optional[str] = ..., user: _Optional[_Mapping[str, Scalar]] = ..., hist: _Optional[_Mapping[str, Column]] = ..., context: _Optional[_Mapping[str, Scalar]] = ..., ad_ids: _Optional[bytes] = ..., ad_features: _Optional[_Mapping[str, Column]] = ..., model_version: _Optional[str] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("ad_ids", "pctr", "pcvr", "pctcvr", "info")
    AD_IDS_FIELD_NUMBER: _ClassVar[int]
    PCTR_FIELD_NUMBER: _ClassVar[int]
    PCVR_FIELD_NUMBER: _ClassVar[int]
    PCTCVR_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    ad_ids: bytes
    pctr: bytes
    pcvr: bytes
    pctcvr: bytes
    info: StageInfo
    def __init__(self, ad_ids: _Optional[bytes] = ..., pctr: _Optional[bytes] = ..., pcvr: _Optional[bytes] = ..., pctcvr: _Optional[bytes] = ..., info: _Optional[_Union[StageInfo, _Mapping]] = ...) -> None: ...

class CatalogUpdate(_message.Message):
    __slots__ = ("ad_id", "vector", "scenes", "status", "cold_score", "features")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Scalar
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Scalar, _Mapping]] = ...) -> None: ...
    AD_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    SCENES_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COLD_SCORE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ad_id: int
    vector: bytes
    scenes: _containers.RepeatedScalarFieldContainer[str]
    status: str
    cold_score: float
    features: _containers.MessageMap[str, Scalar]
    def __init__(self, ad_id: _Optional[int] = ..., vector: _Optional[bytes] = ..., scenes: _Optional[_Iterable[str]] = ..., status: _Optional[str] = ..., cold_score: _Optional[float] = ..., features: _Optional[_Mapping[str, Scalar]] = ...) -> None: ...

class CatalogUpdateResponse(_message.Message):
    __slots__ = ("ad_id", "status", "added")
    AD_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    ad_id: int
    status: str
    added: bool
    def __init__(self, ad_id: _Optional[int] = ..., status: _Optional[str] = ..., added: _Optional[bool] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("bundle",)
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    bundle: str
    def __init__(self, bundle: _Optional[str] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("version", "previous", "load_ms")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    version: str
    previous: str
    load_ms: float
    def __init__(self, version: _Optional[str] = ..., previous: _Optional[str] = ..., load_ms: _Optional[float] = ...) -> None: ...
