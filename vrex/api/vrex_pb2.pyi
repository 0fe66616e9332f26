from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClientEvent(_message.Message):
    __slots__ = ("request_id", "open", "frame", "question", "close")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    open: Open
    frame: Frame
    question: Question
    close: Close
    def __init__(self, request_id: _Optional[int] = ..., open: _Optional[_Union[Open, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ..., question: _Optional[_Union[Question, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ...) -> None: ...

class SessionSettings(_message.Message):
    __slots__ = ("fps", "policy", "max_new_tokens", "temperature", "top_p", "stop")
    FPS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    fps: float
    policy: str
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, fps: _Optional[float] = ..., policy: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("settings", "resume_session_id")
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    RESUME_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    settings: SessionSettings
    resume_session_id: str
    def __init__(self, settings: _Optional[_Union[SessionSettings, _Mapping]] = ..., resume_session_id: _Optional[str] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("rgb", "width", "height")
    RGB_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    rgb: bytes
    width: int
    height: int
    def __init__(self, rgb: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("encoded", "raw", "timestamp_s")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    timestamp_s: float
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ..., timestamp_s: _Optional[float] = ...) -> None: ...

class Question(_message.Message):
    __slots__ = ("text", "max_new_tokens", "temperature", "top_p", "stop")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    text: str
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, text: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerEvent(_message.Message):
    __slots__ = ("request_id", "opened", "frame_ack", "answer_delta", "answer_done", "error", "closed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    FRAME_ACK_FIELD_NUMBER: _ClassVar[int]
    ANSWER_DELTA_FIELD_NUMBER: _ClassVar[int]
    ANSWER_DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    opened: SessionOpened
    frame_ack: FrameAck
    answer_delta: AnswerDelta
    answer_done: AnswerDone
    error: Error
    closed: SessionClosed
    def __init__(self, request_id: _Optional[int] = ..., opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., frame_ack: _Optional[_Union[FrameAck, _Mapping]] = ..., answer_delta: _Optional[_Union[AnswerDelta, _Mapping]] = ..., answer_done: _Optional[_Union[AnswerDone, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., closed: _Optional[_Union[SessionClosed, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "settings", "resumed", "frames_accepted", "history_tokens", "model_name", "is_demo_model", "last_frame_timestamp_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    IS_DEMO_MODEL_FIELD_NUMBER: _ClassVar[int]
    LAST_FRAME_TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    settings: SessionSettings
    resumed: bool
    frames_accepted: int
    history_tokens: int
    model_name: str
    is_demo_model: bool
    last_frame_timestamp_s: float
    def __init__(self, session_id: _Optional[str] = ..., settings: _Optional[_Union[SessionSettings, _Mapping]] = ..., resumed: _Optional[bool] = ..., frames_accepted: _Optional[int] = ..., history_tokens: _Optional[int] = ..., model_name: _Optional[str] = ..., is_demo_model: _Optional[bool] = ..., last_frame_timestamp_s: _Optional[float] = ...) -> None: ...

class FrameAck(_message.Message):
    __slots__ = ("accepted", "dropped_reason", "frame_index", "timestamp_s", "history_tokens", "fetched_fraction", "latency_ms", "ack_latency_ms", "frames_accepted", "frames_dropped")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_REASON_FIELD_NUMBER: _ClassVar[int]
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FETCHED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    ACK_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    dropped_reason: str
    frame_index: int
    timestamp_s: float
    history_tokens: int
    fetched_fraction: float
    latency_ms: float
    ack_latency_ms: float
    frames_accepted: int
    frames_dropped: int
    def __init__(self, accepted: _Optional[bool] = ..., dropped_reason: _Optional[str] = ..., frame_index: _Optional[int] = ..., timestamp_s: _Optional[float] = ..., history_tokens: _Optional[int] = ..., fetched_fraction: _Optional[float] = ..., latency_ms: _Optional[float] = ..., ack_latency_ms: _Optional[float] = ..., frames_accepted: _Optional[int] = ..., frames_dropped: _Optional[int] = ...) -> None: ...

class AnswerDelta(_message.Message):
    __slots__ = ("text", "token_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_id: int
    def __init__(self, text: _Optional[str] = ..., token_id: _Optional[int] = ...) -> None: ...

class AnswerDone(_message.Message):
    __slots__ = ("text", "num_tokens", "finish_reason", "time_to_first_token_ms", "total_ms", "fetched_fraction_text", "stats")
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    FETCHED_FRACTION_TEXT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    text: str
    num_tokens: int
    finish_reason: str
    time_to_first_token_ms: float
    total_ms: float
    fetched_fraction_text: float
    stats: _containers.ScalarMap[str, float]
    def __init__(self, text: _Optional[str] = ..., num_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., time_to_first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., fetched_fraction_text: _Optional[float] = ..., stats: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "code_name", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    code_name: str
    message: str
    def __init__(self, code: _Optional[int] = ..., code_name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class SessionClosed(_message.Message):
    __slots__ = ("session_id", "resumable")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUMABLE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    resumable: bool
    def __init__(self, session_id: _Optional[str] = ..., resumable: _Optional[bool] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_sessions", "max_frame_bytes", "max_frame_pixels", "max_question_chars", "max_new_tokens", "max_message_bytes", "device_kv_budget_bytes", "max_question_tokens")
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUESTION_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUESTION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_sessions: int
    max_frame_bytes: int
    max_frame_pixels: int
    max_question_chars: int
    max_new_tokens: int
    max_message_bytes: int
    device_kv_budget_bytes: int
    max_question_tokens: int
    def __init__(self, max_sessions: _Optional[int] = ..., max_frame_bytes: _Optional[int] = ..., max_frame_pixels: _Optional[int] = ..., max_question_chars: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., device_kv_budget_bytes: _Optional[int] = ..., max_question_tokens: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("model_name", "is_demo_model", "model_notice", "num_layers", "visual_tokens_per_frame", "limits", "version", "grpc_version", "auth_required", "live_sessions", "snapshots_enabled", "image_formats")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    IS_DEMO_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_NOTICE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKENS_PER_FRAME_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GRPC_VERSION_FIELD_NUMBER: _ClassVar[int]
    AUTH_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_ENABLED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMATS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    is_demo_model: bool
    model_notice: str
    num_layers: int
    visual_tokens_per_frame: int
    limits: Limits
    version: str
    grpc_version: str
    auth_required: bool
    live_sessions: int
    snapshots_enabled: bool
    image_formats: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_name: _Optional[str] = ..., is_demo_model: _Optional[bool] = ..., model_notice: _Optional[str] = ..., num_layers: _Optional[int] = ..., visual_tokens_per_frame: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., version: _Optional[str] = ..., grpc_version: _Optional[str] = ..., auth_required: _Optional[bool] = ..., live_sessions: _Optional[int] = ..., snapshots_enabled: _Optional[bool] = ..., image_formats: _Optional[_Iterable[str]] = ...) -> None: ...

class SessionStatsRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionStats(_message.Message):
    __slots__ = ("session_id", "frames_accepted", "frames_dropped", "frames_dropped_backpressure", "history_tokens", "fetched_fraction_frame", "fetched_fraction_text", "kv_bytes", "attached", "extra", "power_sampler", "power_note")
    class KvBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_BACKPRESSURE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FETCHED_FRACTION_FRAME_FIELD_NUMBER: _ClassVar[int]
    FETCHED_FRACTION_TEXT_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    POWER_SAMPLER_FIELD_NUMBER: _ClassVar[int]
    POWER_NOTE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    frames_accepted: int
    frames_dropped: int
    frames_dropped_backpressure: int
    history_tokens: int
    fetched_fraction_frame: float
    fetched_fraction_text: float
    kv_bytes: _containers.ScalarMap[str, int]
    attached: bool
    extra: _containers.ScalarMap[str, float]
    power_sampler: str
    power_note: str
    def __init__(self, session_id: _Optional[str] = ..., frames_accepted: _Optional[int] = ..., frames_dropped: _Optional[int] = ..., frames_dropped_backpressure: _Optional[int] = ..., history_tokens: _Optional[int] = ..., fetched_fraction_frame: _Optional[float] = ..., fetched_fraction_text: _Optional[float] = ..., kv_bytes: _Optional[_Mapping[str, int]] = ..., attached: _Optional[bool] = ..., extra: _Optional[_Mapping[str, float]] = ..., power_sampler: _Optional[str] = ..., power_note: _Optional[str] = ...) -> None: ...

class ResumeSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "resumed", "frames_accepted", "history_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    resumed: bool
    frames_accepted: int
    history_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., resumed: _Optional[bool] = ..., frames_accepted: _Optional[int] = ..., history_tokens: _Optional[int] = ...) -> None: ...
