"""
Exceptions raised by KoboldFS clients and servers.

Every error a server can report travels as an ERROR frame with a numeric
code (see L{koboldfs.protocol.ErrorCode}); clients turn the code back into
one of the classes below with L{error_for_code}, so application code can
catch a precise class rather than parse messages.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """
    Numeric error codes carried by ERROR frames; stable across versions.
    """

    BAD_FRAME = 1  # malformed or oversized frame: the connection closes
    UNKNOWN_OPCODE = 2  # opcode not known: the connection closes
    BAD_REQUEST = 3  # a field missing, of the wrong type, or out of order
    BAD_VERSION = 4  # no protocol version in common
    BAD_NAMESPACE = 5
    BAD_KEY = 6
    NOT_FOUND = 7
    CHECKSUM_MISMATCH = 8
    SIZE_MISMATCH = 9
    TOO_LARGE = 10  # file larger than the server accepts
    NO_SPACE = 11  # the server's disk is full
    UNAVAILABLE = 12  # transient: metadata database down, no live replica
    BUSY = 13  # too many connections or uploads: try another server
    CORRUPT = 14  # a stored replica failed its checksum while being read
    READONLY = 15  # this server takes no new files
    AUTH_REQUIRED = 16
    FORBIDDEN = 17
    TIMEOUT = 18
    INTERNAL = 19  # a bug: the server logged a traceback
    TXN_UNKNOWN = 20  # no such transaction: never begun, aborted, or expired
    TXN_STATE = 21  # the transaction cannot do that now (e.g. a put after prepare)
    PRECONDITION = 22  # a conditional write's condition did not hold: nothing was written
    DATA_LOST = 23  # no good copy of the file is left anywhere: not retryable


#: Codes after which the same request may succeed on another server or later.
RETRYABLE = frozenset(
    {
        ErrorCode.UNAVAILABLE,
        ErrorCode.BUSY,
        ErrorCode.CORRUPT,
        ErrorCode.READONLY,
        ErrorCode.NO_SPACE,
        ErrorCode.TIMEOUT,
    }
)


class KoboldError(Exception):
    """
    Base class of every KoboldFS error.

    @ivar code: the L{ErrorCode} this error travels as.
    """

    code = ErrorCode.INTERNAL

    @property
    def retryable(self) -> bool:
        """
        Whether the same request may succeed on another server or later.
        """
        return self.code in RETRYABLE


class InvalidName(KoboldError, ValueError):
    """
    A namespace or key that KoboldFS cannot store; raised before sending.
    """


class InvalidNamespace(InvalidName):
    code = ErrorCode.BAD_NAMESPACE


class InvalidKey(InvalidName):
    code = ErrorCode.BAD_KEY


class ProtocolError(KoboldError):
    """
    The peer broke the wire protocol: the connection cannot be trusted.
    """

    code = ErrorCode.BAD_FRAME

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_FRAME):
        super().__init__(message)
        self.code = code


class ServerError(KoboldError):
    """
    A server answered a request with an ERROR frame.
    """

    def __init__(self, code: int, message: str):
        super().__init__(message)
        try:
            self.code = ErrorCode(code)
        except ValueError:
            self.code = ErrorCode.INTERNAL
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class NotFound(ServerError):
    pass


class ChecksumMismatch(ServerError):
    pass


class DataLost(ChecksumMismatch):
    """
    Every copy of the file failed its checksum or is missing from its disk:
    no server has its bytes (the bad copies are kept in the servers'
    C{quarantine/}).  Unlike L{Unavailable}, trying again will not help.
    """

    code = ErrorCode.DATA_LOST


class Unavailable(ServerError):
    """
    No server could complete the request: all were down or failing.
    """


class ConnectionFailed(KoboldError):
    """
    A server could not be reached, or dropped the connection mid-request.
    """

    code = ErrorCode.UNAVAILABLE


_BY_CODE: dict[ErrorCode, type[ServerError]] = {
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.CHECKSUM_MISMATCH: ChecksumMismatch,
    ErrorCode.UNAVAILABLE: Unavailable,
    ErrorCode.DATA_LOST: DataLost,
}


def error_for_code(code: int, message: str) -> ServerError:
    """
    The exception a client raises for an ERROR frame.
    """
    try:
        cls = _BY_CODE.get(ErrorCode(code), ServerError)
    except ValueError:
        cls = ServerError
    return cls(code, message)


class NoSpace(ServerError):
    """
    The server's disk is full; another server may have room.
    """

    code = ErrorCode.NO_SPACE


class SizeMismatch(ServerError):
    """
    An upload's byte count differs from the size the client announced.
    """

    code = ErrorCode.SIZE_MISMATCH


class TooLarge(ServerError):
    """
    A file is larger than the server accepts.
    """

    code = ErrorCode.TOO_LARGE


class CorruptReplica(ServerError):
    """
    A stored copy failed its checksum or has the wrong size; others may not.
    """

    code = ErrorCode.CORRUPT


class AuthRequired(ServerError):
    """
    The server takes requests only from authenticated clients: give the
    client a key.
    """

    code = ErrorCode.AUTH_REQUIRED


class Forbidden(ServerError):
    """
    A wrong key, a key of another namespace, or a read-only key asked to
    write.
    """

    code = ErrorCode.FORBIDDEN


class Busy(ServerError):
    """
    The server is at a limit (connections, uploads): another may not be.
    """

    code = ErrorCode.BUSY


_BY_CODE.update(
    {
        ErrorCode.AUTH_REQUIRED: AuthRequired,
        ErrorCode.FORBIDDEN: Forbidden,
        ErrorCode.BUSY: Busy,
        ErrorCode.NO_SPACE: NoSpace,
        ErrorCode.SIZE_MISMATCH: SizeMismatch,
        ErrorCode.TOO_LARGE: TooLarge,
        ErrorCode.CORRUPT: CorruptReplica,
    }
)


class TransactionError(ServerError):
    """
    A transaction request was refused: the transaction is unknown (aborted,
    expired, or collected) or in a state that does not allow it.
    """


_BY_CODE.update({ErrorCode.TXN_UNKNOWN: TransactionError, ErrorCode.TXN_STATE: TransactionError})


class PreconditionFailed(ServerError):
    """
    A conditional write (only if absent, only if the live version is a
    given one) found its condition false when it was to be recorded:
    nothing was published.
    """

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.PRECONDITION, message)


class MultipartError(ServerError):
    """
    A multipart upload request was refused.

    @ivar s3_code: S3's name for why: C{NoSuchUpload}, C{InvalidPart},
        C{InvalidPartOrder}, C{EntityTooSmall} or C{InvalidArgument}.
    """

    def __init__(self, s3_code: str, message: str) -> None:
        code = ErrorCode.NOT_FOUND if s3_code == "NoSuchUpload" else ErrorCode.BAD_REQUEST
        super().__init__(code, message)
        self.s3_code = s3_code
