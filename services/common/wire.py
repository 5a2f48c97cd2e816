"""Wire messages: pydantic mirrors of proto/cascade/v1/{stages,ads}.proto, and their encodings.

Every message in the .proto files has a pydantic model here with the same field names (checked
by tests/test_wire.py), so the gateway and the stages speak one vocabulary whether they call
each other in-process (pydantic objects) or over HTTP (bytes).

Encodings, chosen by Content-Type:
- `application/json` (default): the pydantic JSON. Array fields (candidate ids, scores,
  vectors) are emitted as base64 of packed little-endian int64 / float32, because a JSON list of
  2,000 ids costs far more to print and parse than one string; plain JSON lists are accepted.
- `application/x-protobuf`: the generated messages in proto/cascade/v1/*_pb2.py; the same
  array fields are `bytes`, so decoding a candidate list is one `np.frombuffer`.

The *_pb2.py files are generated and checked in (the runtime needs only `protobuf`, no protoc).
After editing a .proto, regenerate with (grpcio-tools is a dev dependency):
    .venv/bin/python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto \
        proto/cascade/v1/stages.proto proto/cascade/v1/ads.proto
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, TypeVar

import numpy as np
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
    field_validator,
)

from proto.cascade.v1 import ads_pb2, stages_pb2

JSON = "application/json"
PROTOBUF = "application/x-protobuf"
MAX_SLOTS = 50  # hard ceiling; the gateway caps slots per scene below this


class WireError(ValueError):
    """A body that cannot be decoded at all (bad protobuf, unsupported content type)."""


# ---- packed arrays ---------------------------------------------------------------------------

INT64_MAX = 2**63 - 1  # ids are int64 columns everywhere: a larger one is a 422, not a 500
MAX_MICROS = 10**15  # money in micros: a billion a day is past any budget; sums stay in int64


def _array_validator(dtype: str):
    """Accept ndarray, raw little-endian bytes (protobuf), base64 str (JSON) or a list."""
    size = np.dtype(dtype).itemsize

    integers = dtype == "<i8"

    def finite(array: np.ndarray) -> np.ndarray:
        """Float arrays must hold finite numbers: one NaN or inf in a vector poisons every
        inner product (and faiss's ordering) downstream."""
        if not integers and array.size and not np.isfinite(array).all():
            raise ValueError("values must be finite (no NaN or infinity)")
        return array

    def validate(value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray):
            if integers and value.dtype.kind not in "iu" and value.size:
                raise ValueError(f"expected an integer array, got {value.dtype}")
            return finite(np.ascontiguousarray(value, dtype=dtype).reshape(-1))
        if isinstance(value, str):
            try:
                value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("not valid base64") from None
        if isinstance(value, bytes | bytearray | memoryview):
            if len(value) % size:
                raise ValueError(f"byte length {len(value)} is not a multiple of {size}")
            return finite(np.frombuffer(value, dtype=dtype))
        if isinstance(value, list | tuple):
            if integers and any(isinstance(v, bool) or not isinstance(v, int) for v in value):
                raise ValueError("expected a list of integers")
            if not integers and any(isinstance(v, bool) or not isinstance(v, int | float)
                                    for v in value):
                raise ValueError("expected a list of numbers")
            try:
                with np.errstate(over="raise", invalid="raise"):
                    array = np.asarray(value, dtype=dtype)
            except (OverflowError, FloatingPointError):
                raise ValueError("a value is out of range for "
                                 + ("int64" if integers else "float32")) from None
            return finite(array)
        raise ValueError("expected a list, a base64 string or bytes")

    return validate


def _to_base64(value: np.ndarray) -> str:
    return base64.b64encode(value.tobytes()).decode("ascii")


IntArray = Annotated[
    np.ndarray,
    PlainValidator(_array_validator("<i8")),
    PlainSerializer(_to_base64, return_type=str, when_used="json"),
    WithJsonSchema({"anyOf": [{"type": "string", "contentEncoding": "base64",
                               "description": "packed little-endian int64"},
                              {"type": "array", "items": {"type": "integer"}}]}),
]
FloatArray = Annotated[
    np.ndarray,
    PlainValidator(_array_validator("<f4")),
    PlainSerializer(_to_base64, return_type=str, when_used="json"),
    WithJsonSchema({"anyOf": [{"type": "string", "contentEncoding": "base64",
                               "description": "packed little-endian float32"},
                              {"type": "array", "items": {"type": "number"}}]}),
]
ScalarValue = int | float | str


def _empty_ints() -> np.ndarray:
    return np.empty(0, dtype="<i8")


def _empty_floats() -> np.ndarray:
    return np.empty(0, dtype="<f4")


class WireModel(BaseModel):
    """Base for wire messages: unknown fields are refused so a typo is a 422, not ignored."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


# ---- stages.proto ----------------------------------------------------------------------------

class Column(WireModel):
    """One raw feature over a list (history or candidates); exactly one of the three is set."""

    ints: IntArray | None = None
    strs: list[str] | None = None
    floats: FloatArray | None = None

    def values(self) -> np.ndarray | list[str]:
        for value in (self.ints, self.strs, self.floats):
            if value is not None:
                return value
        return _empty_ints()

    def __len__(self) -> int:
        return len(self.values())


class Eligibility(WireModel):
    exclude_ad_ids: IntArray = Field(default_factory=_empty_ints)
    include_paused: bool = False
    ignore_scene_targeting: bool = False


class StageInfo(WireModel):
    model_version: str = ""
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    partial: bool = False


class _UserPart(WireModel):
    """Fields every stage request shares: who, where, and their raw features."""

    request_id: str = ""
    user_id: str = ""
    scene: str = Field(min_length=1)
    user: dict[str, ScalarValue] = Field(default_factory=dict)
    hist: dict[str, Column] = Field(default_factory=dict)
    context: dict[str, ScalarValue] = Field(default_factory=dict)
    # The bundle version the gateway pinned for this request (empty: the stage's current one).
    # During a reload a stage that already switched still holds the previous state, and scores
    # a request pinned to it with it, so every answer is scored by one bundle end to end.
    model_version: str = ""

    @field_validator("user_id", mode="before")
    @classmethod
    def _user_id_as_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    def history_len(self) -> int:
        return max((len(c) for c in self.hist.values()), default=0)


class RecallRequest(_UserPart):
    k: int = Field(default=2000, ge=1)
    user_vector: FloatArray | None = None
    eligibility: Eligibility = Field(default_factory=Eligibility)
    debug: bool = False
    # Shares of K per recall channel ("category", "high_value", "new"; the two-tower gets the
    # rest) and "recent_categories"; None: the retrieval stage's defaults.
    quotas: dict[str, float] | None = None


class RecallResponse(WireModel):
    ad_ids: IntArray = Field(default_factory=_empty_ints)
    scores: FloatArray = Field(default_factory=_empty_floats)
    channel: str = ""
    eligible: int = 0
    info: StageInfo = Field(default_factory=StageInfo)
    # Per candidate: the recall channel that produced it, as a code into `channel_names`
    # (empty: every candidate came from `channel`).
    channels: IntArray = Field(default_factory=_empty_ints)
    channel_names: list[str] = Field(default_factory=list)

    def candidate_channels(self) -> list[str]:
        """Each candidate's channel name, aligned with `ad_ids`."""
        if self.channels.size != self.ad_ids.size or not self.channel_names:
            return [self.channel] * int(self.ad_ids.size)
        return [self.channel_names[int(c)] for c in self.channels]


class PrerankRequest(_UserPart):
    k: int = Field(default=200, ge=1)
    ad_ids: IntArray = Field(default_factory=_empty_ints)
    # Click value per candidate (micros, aligned with ad_ids). When given, the top K is by
    # expected eCPM, pCTR x value, so a high-value ad is not cut for a slightly lower pCTR.
    values: FloatArray | None = None


class PrerankResponse(WireModel):
    ad_ids: IntArray = Field(default_factory=_empty_ints)
    scores: FloatArray = Field(default_factory=_empty_floats)
    info: StageInfo = Field(default_factory=StageInfo)


class RankRequest(_UserPart):
    ad_ids: IntArray = Field(default_factory=_empty_ints)
    ad_features: dict[str, Column] = Field(default_factory=dict)


class RankResponse(WireModel):
    ad_ids: IntArray = Field(default_factory=_empty_ints)
    pctr: FloatArray = Field(default_factory=_empty_floats)
    pcvr: FloatArray = Field(default_factory=_empty_floats)
    pctcvr: FloatArray = Field(default_factory=_empty_floats)
    info: StageInfo = Field(default_factory=StageInfo)


class CatalogUpdate(WireModel):
    ad_id: int = Field(ge=0, le=INT64_MAX)
    vector: FloatArray | None = None
    scenes: list[str] = Field(default_factory=list)
    status: str = Field(default="active", pattern="^(active|paused)$")
    cold_score: float = 0.0
    features: dict[str, ScalarValue] = Field(default_factory=dict)


class CatalogUpdateResponse(WireModel):
    ad_id: int
    status: str
    added: bool = False


class ReloadRequest(WireModel):
    bundle: str = ""


class ReloadResponse(WireModel):
    version: str
    previous: str = ""
    load_ms: float = 0.0


# ---- ads.proto (public API) ------------------------------------------------------------------

class AdsContext(WireModel):
    device: str = ""
    hour: int | None = Field(default=None, ge=0, le=23)


class AdsRequest(WireModel):
    request_id: str = Field(min_length=1, max_length=128)
    user_id: str = Field(min_length=1, max_length=128)
    scene: str = Field(min_length=1, max_length=64)
    slots: int = Field(ge=1, le=MAX_SLOTS)
    context: AdsContext = Field(default_factory=AdsContext)
    budget_ms: float | None = Field(default=None, gt=0, le=10_000)
    debug: bool = False

    @field_validator("user_id", "request_id", mode="before")
    @classmethod
    def _number_as_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class AdSlot(WireModel):
    position: int
    ad_id: int
    campaign_id: int
    creative_id: str
    price_micros: int
    pctr: float
    pcvr: float
    ecpm: float
    token: str


class StageReport(WireModel):
    name: str
    count_in: int = 0
    count_out: int = 0
    ms: float = 0.0
    degraded: bool = False
    reason: str = ""
    dropped: dict[str, int] = Field(default_factory=dict)  # screening: candidates per reason


class DebugCandidate(WireModel):
    ad_id: int
    score: float
    channel: str | None = None  # the recall channel it came from (recall stage only)


class DebugStage(WireModel):
    name: str
    candidates: list[DebugCandidate] = Field(default_factory=list)


class AdsResponse(WireModel):
    request_id: str
    slots: list[AdSlot] = Field(default_factory=list)
    stages: list[StageReport] = Field(default_factory=list)
    degraded: bool = False
    model_version: str = ""
    debug: list[DebugStage] = Field(default_factory=list)


class EventRequest(WireModel):
    event_id: str = Field(min_length=1, max_length=128)
    token: str = Field(min_length=1, max_length=4096)
    type: str = Field(pattern="^(impression|click|conversion)$")


class EventResponse(WireModel):
    event_id: str
    accepted: bool
    duplicate: bool = False


# ---- protobuf <-> pydantic -------------------------------------------------------------------

PROTO_MODULES = (stages_pb2, ads_pb2)
MODELS: dict[str, type[WireModel]] = {
    cls.__name__: cls for cls in WireModel.__subclasses__() + _UserPart.__subclasses__()
    if not cls.__name__.startswith("_")
}
M = TypeVar("M", bound=WireModel)


def proto_class(model: type[WireModel]) -> type[ProtoMessage]:
    """The generated protobuf class with the same name as `model`."""
    for module in PROTO_MODULES:
        found = getattr(module, model.__name__, None)
        if found is not None:
            return found
    raise WireError(f"{model.__name__} has no protobuf message")


def _is_map(fd: Any) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _set_scalar(target: ProtoMessage, value: ScalarValue) -> None:
    if isinstance(value, bool | int):
        target.int_value = int(value)
    elif isinstance(value, float):
        target.float_value = value
    else:
        target.string_value = str(value)


def _fill(msg: ProtoMessage, model: BaseModel) -> ProtoMessage:
    fields = msg.DESCRIPTOR.fields_by_name
    for name in type(model).model_fields:
        value = getattr(model, name)
        if value is None:
            continue
        fd = fields[name]
        if _is_map(fd):
            target = getattr(msg, name)
            value_fd = fd.message_type.fields_by_name["value"]
            for key, item in value.items():
                if value_fd.message_type is None:
                    target[key] = item
                elif value_fd.message_type.name == "Scalar":
                    _set_scalar(target[key], item)
                else:
                    _fill(target[key], item)
        elif fd.is_repeated:
            target = getattr(msg, name)
            if fd.message_type is None:
                target.extend(value)
            else:
                for item in value:
                    _fill(target.add(), item)
        elif fd.message_type is not None:
            sub = getattr(msg, name)
            sub.SetInParent()
            _fill(sub, value)
        elif isinstance(value, np.ndarray):
            setattr(msg, name, value.tobytes())
        else:
            setattr(msg, name, value)
    return msg


def _scalar_value(msg: ProtoMessage) -> ScalarValue:
    kind = msg.WhichOneof("kind")
    return getattr(msg, kind) if kind else ""


def _read(msg: ProtoMessage) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        name = fd.name
        value = getattr(msg, name)
        if _is_map(fd):
            value_fd = fd.message_type.fields_by_name["value"]
            if value_fd.message_type is None:
                out[name] = dict(value)
            elif value_fd.message_type.name == "Scalar":
                out[name] = {k: _scalar_value(v) for k, v in value.items()}
            else:
                out[name] = {k: _read(v) for k, v in value.items()}
        elif fd.is_repeated:
            out[name] = [_read(v) for v in value] if fd.message_type else list(value)
        elif fd.message_type is not None or fd.has_presence:
            if msg.HasField(name):
                out[name] = _read(value) if fd.message_type is not None else value
        elif fd.type == fd.TYPE_BYTES:
            if value:  # empty bytes = absent: the model's default (empty array or None)
                out[name] = value
        else:
            out[name] = value
    return out


def to_proto(model: WireModel) -> ProtoMessage:
    return _fill(proto_class(type(model))(), model)


def from_proto(cls: type[M], msg: ProtoMessage) -> M:
    """Validate a protobuf message through the pydantic model (same rules as JSON)."""
    return cls.model_validate(_read(msg))


def media_type(content_type: str | None) -> str:
    """Normalise a Content-Type / Accept header to JSON or PROTOBUF (JSON when unsure)."""
    if content_type and ("protobuf" in content_type or "proto" in content_type.split(";")[0]):
        return PROTOBUF
    return JSON


def encode(model: WireModel, content_type: str = JSON) -> bytes:
    if media_type(content_type) == PROTOBUF:
        return to_proto(model).SerializeToString()
    return model.__pydantic_serializer__.to_json(model, exclude_none=True)


def decode(cls: type[M], body: bytes, content_type: str | None = JSON) -> M:
    """Parse and validate; raises WireError (undecodable) or pydantic.ValidationError."""
    if media_type(content_type) == PROTOBUF:
        msg = proto_class(cls)()
        try:
            msg.ParseFromString(body)
        except DecodeError as exc:
            raise WireError(f"body is not a valid protobuf {cls.__name__}: {exc}") from None
        return from_proto(cls, msg)
    return cls.model_validate_json(body or b"{}")
