import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_ALLOW: _ClassVar[Decision]
    DECISION_DENY: _ClassVar[Decision]
    DECISION_DOWNGRADE: _ClassVar[Decision]
DECISION_UNSPECIFIED: Decision
DECISION_ALLOW: Decision
DECISION_DENY: Decision
DECISION_DOWNGRADE: Decision

class Principal(_message.Message):
    __slots__ = ("department", "team", "user", "application")
    DEPARTMENT_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    department: str
    team: str
    user: str
    application: str
    def __init__(self, department: _Optional[str] = ..., team: _Optional[str] = ..., user: _Optional[str] = ..., application: _Optional[str] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content", "name")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    name: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class Messages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ("request_id", "principal", "model", "prompt", "messages", "input_tokens", "max_output_tokens", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    principal: Principal
    model: str
    prompt: str
    messages: Messages
    input_tokens: int
    max_output_tokens: int
    labels: _containers.ScalarMap[str, str]
    def __init__(self, request_id: _Optional[str] = ..., principal: _Optional[_Union[Principal, _Mapping]] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Union[Messages, _Mapping]] = ..., input_tokens: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class BudgetStatus(_message.Message):
    __slots__ = ("scope", "budget", "period", "window", "limit_micros", "spent_micros", "reserved_micros", "rule", "shadow")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    SPENT_MICROS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_MICROS_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    scope: str
    budget: str
    period: str
    window: str
    limit_micros: int
    spent_micros: int
    reserved_micros: int
    rule: str
    shadow: bool
    def __init__(self, scope: _Optional[str] = ..., budget: _Optional[str] = ..., period: _Optional[str] = ..., window: _Optional[str] = ..., limit_micros: _Optional[int] = ..., spent_micros: _Optional[int] = ..., reserved_micros: _Optional[int] = ..., rule: _Optional[str] = ..., shadow: _Optional[bool] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("decision", "model", "reason_code", "message", "rule", "policy_version", "reservation_id", "estimated_cost_micros", "input_tokens", "input_tokens_estimated", "max_output_tokens", "budgets", "requested_model", "shadow", "shadow_decision", "replayed", "reservation_expires_at", "unverified")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_MODEL_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    SHADOW_DECISION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    UNVERIFIED_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    model: str
    reason_code: str
    message: str
    rule: str
    policy_version: str
    reservation_id: str
    estimated_cost_micros: int
    input_tokens: int
    input_tokens_estimated: bool
    max_output_tokens: int
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetStatus]
    requested_model: str
    shadow: bool
    shadow_decision: Decision
    replayed: bool
    reservation_expires_at: int
    unverified: bool
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., model: _Optional[str] = ..., reason_code: _Optional[str] = ..., message: _Optional[str] = ..., rule: _Optional[str] = ..., policy_version: _Optional[str] = ..., reservation_id: _Optional[str] = ..., estimated_cost_micros: _Optional[int] = ..., input_tokens: _Optional[int] = ..., input_tokens_estimated: _Optional[bool] = ..., max_output_tokens: _Optional[int] = ..., budgets: _Optional[_Iterable[_Union[BudgetStatus, _Mapping]]] = ..., requested_model: _Optional[str] = ..., shadow: _Optional[bool] = ..., shadow_decision: _Optional[_Union[Decision, str]] = ..., replayed: _Optional[bool] = ..., reservation_expires_at: _Optional[int] = ..., unverified: _Optional[bool] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("reservation_id", "input_tokens", "cached_input_tokens", "output_tokens")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    def __init__(self, reservation_id: _Optional[str] = ..., input_tokens: _Optional[int] = ..., cached_input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("cost_micros", "reserved_micros", "overage_micros", "already_committed")
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_MICROS_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_MICROS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    cost_micros: int
    reserved_micros: int
    overage_micros: int
    already_committed: bool
    def __init__(self, cost_micros: _Optional[int] = ..., reserved_micros: _Optional[int] = ..., overage_micros: _Optional[int] = ..., already_committed: _Optional[bool] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released_micros", "already_released")
    RELEASED_MICROS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_RELEASED_FIELD_NUMBER: _ClassVar[int]
    released_micros: int
    already_released: bool
    def __init__(self, released_micros: _Optional[int] = ..., already_released: _Optional[bool] = ...) -> None: ...

class GetBudgetRequest(_message.Message):
    __slots__ = ("principal",)
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    principal: Principal
    def __init__(self, principal: _Optional[_Union[Principal, _Mapping]] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("budgets", "policy_version")
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetStatus]
    policy_version: str
    def __init__(self, budgets: _Optional[_Iterable[_Union[BudgetStatus, _Mapping]]] = ..., policy_version: _Optional[str] = ...) -> None: ...

class GetPolicyStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RejectedPolicy(_message.Message):
    __slots__ = ("content_hash", "rejected_at", "errors")
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    REJECTED_AT_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    content_hash: str
    rejected_at: _timestamp_pb2.Timestamp
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, content_hash: _Optional[str] = ..., rejected_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class PolicyStatus(_message.Message):
    __slots__ = ("version", "content_hash", "loaded_at", "directory", "files", "warnings", "reloads", "rejections", "last_rejected", "last_checked_at")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    RELOADS_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_REJECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKED_AT_FIELD_NUMBER: _ClassVar[int]
    version: str
    content_hash: str
    loaded_at: _timestamp_pb2.Timestamp
    directory: str
    files: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    reloads: int
    rejections: int
    last_rejected: RejectedPolicy
    last_checked_at: _timestamp_pb2.Timestamp
    def __init__(self, version: _Optional[str] = ..., content_hash: _Optional[str] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., directory: _Optional[str] = ..., files: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ..., reloads: _Optional[int] = ..., rejections: _Optional[int] = ..., last_rejected: _Optional[_Union[RejectedPolicy, _Mapping]] = ..., last_checked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
