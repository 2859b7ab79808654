from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChallengeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChallengeReply(_message.Message):
    __slots__ = ("challenge",)
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    challenge: bytes
    def __init__(self, challenge: _Optional[bytes] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("cert_pem", "node_id", "pins_digest", "expect_node", "challenge", "client_nonce", "signature")
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PINS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    EXPECT_NODE_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    cert_pem: bytes
    node_id: str
    pins_digest: bytes
    expect_node: str
    challenge: bytes
    client_nonce: bytes
    signature: bytes
    def __init__(self, cert_pem: _Optional[bytes] = ..., node_id: _Optional[str] = ..., pins_digest: _Optional[bytes] = ..., expect_node: _Optional[str] = ..., challenge: _Optional[bytes] = ..., client_nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("ok", "reason", "field", "cert_pem", "node_id", "signature")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    field: str
    cert_pem: bytes
    node_id: str
    signature: bytes
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ..., field: _Optional[str] = ..., cert_pem: _Optional[bytes] = ..., node_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("control", "tensor", "arrays", "blob", "error", "pad", "payload")
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    control: Control
    tensor: TensorHeader
    arrays: ArraysHeader
    blob: BlobHeader
    error: ErrorFrame
    pad: bytes
    payload: bytes
    def __init__(self, control: _Optional[_Union[Control, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., arrays: _Optional[_Union[ArraysHeader, _Mapping]] = ..., blob: _Optional[_Union[BlobHeader, _Mapping]] = ..., error: _Optional[_Union[ErrorFrame, _Mapping]] = ..., pad: _Optional[bytes] = ..., payload: _Optional[bytes] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("kind", "iteration")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[Control.Kind]
        READY: _ClassVar[Control.Kind]
        START: _ClassVar[Control.Kind]
        COMMIT: _ClassVar[Control.Kind]
        ABORT: _ClassVar[Control.Kind]
        CLOSE: _ClassVar[Control.Kind]
        CLOSE_ACK: _ClassVar[Control.Kind]
    UNKNOWN: Control.Kind
    READY: Control.Kind
    START: Control.Kind
    COMMIT: Control.Kind
    ABORT: Control.Kind
    CLOSE: Control.Kind
    CLOSE_ACK: Control.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    kind: Control.Kind
    iteration: int
    def __init__(self, kind: _Optional[_Union[Control.Kind, str]] = ..., iteration: _Optional[int] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("flow", "step", "dtype", "shape", "chunk", "chunks", "total_bytes", "offset")
    FLOW_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    flow: str
    step: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    chunk: int
    chunks: int
    total_bytes: int
    offset: int
    def __init__(self, flow: _Optional[str] = ..., step: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., chunk: _Optional[int] = ..., chunks: _Optional[int] = ..., total_bytes: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class ArraySpec(_message.Message):
    __slots__ = ("dtype", "shape", "offset", "nbytes")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    nbytes: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class ArraysHeader(_message.Message):
    __slots__ = ("flow", "step", "arrays", "chunk", "chunks", "total_bytes", "offset")
    FLOW_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    flow: str
    step: int
    arrays: _containers.RepeatedCompositeFieldContainer[ArraySpec]
    chunk: int
    chunks: int
    total_bytes: int
    offset: int
    def __init__(self, flow: _Optional[str] = ..., step: _Optional[int] = ..., arrays: _Optional[_Iterable[_Union[ArraySpec, _Mapping]]] = ..., chunk: _Optional[int] = ..., chunks: _Optional[int] = ..., total_bytes: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class BlobHeader(_message.Message):
    __slots__ = ("flow", "step", "chunk", "chunks", "total_bytes", "offset")
    FLOW_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    flow: str
    step: int
    chunk: int
    chunks: int
    total_bytes: int
    offset: int
    def __init__(self, flow: _Optional[str] = ..., step: _Optional[int] = ..., chunk: _Optional[int] = ..., chunks: _Optional[int] = ..., total_bytes: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class ErrorFrame(_message.Message):
    __slots__ = ("flow", "step", "reason")
    FLOW_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    flow: str
    step: int
    reason: str
    def __init__(self, flow: _Optional[str] = ..., step: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...
