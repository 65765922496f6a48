"""
S3 error codes as exceptions, and the XML error document S3 answers with.

Clients act on the code (boto3 raises C{ClientError} with
C{Error.Code}, rclone and s3fs map codes to their own errors), so each
code is a class: codec functions raise the precise one, and the adapter
renders whatever it catches with L{S3Error.body}.  Extra elements that
AWS adds for some codes (the C{Key} of C{NoSuchKey}, the
C{StringToSign} of C{SignatureDoesNotMatch}, ...) are passed as keyword
arguments and rendered in the order given.
"""

from __future__ import annotations

from typing import ClassVar
from xml.sax.saxutils import escape


class S3Error(Exception):
    """
    An S3 error response.

    @cvar code: the S3 error code, e.g. C{"NoSuchKey"}.
    @cvar status: the HTTP status it is sent with.
    @cvar default_message: AWS's message for it, when none is given.
    @ivar message: the message sent to the client.
    @ivar resource: the bucket or object concerned (C{/bucket/key}), or
        None.
    @ivar extra: further elements of the error document, in order (pass
        names that are not identifiers as C{**{"Content-MD5": ...}}).
    """

    code: ClassVar[str] = "InternalError"
    status: ClassVar[int] = 500
    default_message: ClassVar[str] = "We encountered an internal error. Please try again."

    def __init__(
        self, message: str | None = None, *, resource: str | None = None, **extra: object
    ) -> None:
        self.message = message if message is not None else self.default_message
        self.resource = resource
        self.extra = {name: str(value) for name, value in extra.items()}
        super().__init__(f"{self.code}: {self.message}")

    @property
    def has_body(self) -> bool:
        """
        Whether the response carries an error document (a 304 carries none).
        """
        return self.status not in (204, 304)

    def body(self, request_id: str, host_id: str | None = None) -> bytes:
        """
        The XML error document, as AWS writes it: C{Code}, C{Message}, the
        extra elements, C{Resource}, C{RequestId}, C{HostId}; or C{b""} for
        a status that has no body.
        """
        if not self.has_body:
            return b""
        parts = [
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error>',
            _element("Code", self.code),
            _element("Message", self.message),
        ]
        parts += [_element(name, value) for name, value in self.extra.items()]
        if self.resource is not None:
            parts.append(_element("Resource", self.resource))
        parts.append(_element("RequestId", request_id))
        if host_id is not None:
            parts.append(_element("HostId", host_id))
        parts.append("</Error>")
        return "".join(parts).encode("utf-8")


def _element(name: str, text: str) -> str:
    return f"<{name}>{escape(text)}</{name}>"


#: Every error class by its code; the first class defined for a code wins
#: (L{RequestExpired} shares C{AccessDenied}'s).
ERRORS: dict[str, type[S3Error]] = {}


def _register(cls: type[S3Error]) -> type[S3Error]:
    ERRORS.setdefault(cls.code, cls)
    return cls


def error_class(code: str) -> type[S3Error]:
    """
    The class of an S3 error code (L{InternalError} for an unknown one).
    """
    return ERRORS.get(code, InternalError)


# The classes: one per code, in the order of AWS's list of error codes.
# Names follow the codes, except NotImplemented (a builtin): NotImplementedS3.


@_register
class AccessDenied(S3Error):
    code, status, default_message = "AccessDenied", 403, "Access Denied"


class RequestExpired(AccessDenied):
    """
    A presigned URL used after its expiry: AWS answers C{AccessDenied}
    with this message (C{ExpiredToken} is for expired session tokens,
    which KoboldFS does not issue), and the elements C{X-Amz-Expires},
    C{Expires} and C{ServerTime}.
    """

    default_message = "Request has expired"

    def __init__(self, expires_seconds: int, expires: str, server_time: str) -> None:
        extra = {"X-Amz-Expires": str(expires_seconds), "Expires": expires,
                 "ServerTime": server_time}
        super().__init__(None, **extra)


@_register
class AuthorizationHeaderMalformed(S3Error):
    code, status = "AuthorizationHeaderMalformed", 400
    default_message = "The authorization header is malformed."


@_register
class AuthorizationQueryParametersError(S3Error):
    code, status = "AuthorizationQueryParametersError", 400
    default_message = "Error parsing the X-Amz-Credential parameter."


@_register
class BadDigest(S3Error):
    code, status = "BadDigest", 400
    default_message = "The Content-MD5 you specified did not match what we received."


@_register
class BucketAlreadyExists(S3Error):
    code, status = "BucketAlreadyExists", 409
    default_message = (
        "The requested bucket name is not available. The bucket namespace is shared by all "
        "users of the system. Please select a different name and try again."
    )


@_register
class BucketAlreadyOwnedByYou(S3Error):
    code, status = "BucketAlreadyOwnedByYou", 409
    default_message = (
        "Your previous request to create the named bucket succeeded and you already own it."
    )


@_register
class BucketNotEmpty(S3Error):
    code, status = "BucketNotEmpty", 409
    default_message = "The bucket you tried to delete is not empty"


@_register
class EntityTooLarge(S3Error):
    code, status = "EntityTooLarge", 400
    default_message = "Your proposed upload exceeds the maximum allowed object size."


@_register
class EntityTooSmall(S3Error):
    code, status = "EntityTooSmall", 400
    default_message = "Your proposed upload is smaller than the minimum allowed object size."


@_register
class IncompleteBody(S3Error):
    code, status = "IncompleteBody", 400
    default_message = (
        "You did not provide the number of bytes specified by the Content-Length HTTP header"
    )


@_register
class InternalError(S3Error):
    pass


@_register
class InvalidAccessKeyId(S3Error):
    code, status = "InvalidAccessKeyId", 403
    default_message = "The AWS Access Key Id you provided does not exist in our records."


@_register
class InvalidArgument(S3Error):
    code, status, default_message = "InvalidArgument", 400, "Invalid Argument"


@_register
class InvalidBucketName(S3Error):
    code, status, default_message = "InvalidBucketName", 400, "The specified bucket is not valid."


@_register
class InvalidDigest(S3Error):
    code, status = "InvalidDigest", 400
    default_message = "The Content-MD5 you specified was invalid."


@_register
class InvalidLocationConstraint(S3Error):
    code, status = "InvalidLocationConstraint", 400
    default_message = "The specified location constraint is not valid."


@_register
class InvalidPart(S3Error):
    code, status = "InvalidPart", 400
    default_message = (
        "One or more of the specified parts could not be found. The part may not have been "
        "uploaded, or the specified entity tag may not match the part's entity tag."
    )


@_register
class InvalidPartOrder(S3Error):
    code, status = "InvalidPartOrder", 400
    default_message = (
        "The list of parts was not in ascending order. Parts must be ordered by part number."
    )


@_register
class InvalidRange(S3Error):
    code, status, default_message = "InvalidRange", 416, "The requested range is not satisfiable"


@_register
class InvalidRequest(S3Error):
    code, status, default_message = "InvalidRequest", 400, "Invalid Request"


@_register
class InvalidURI(S3Error):
    code, status, default_message = "InvalidURI", 400, "Couldn't parse the specified URI."


@_register
class KeyTooLongError(S3Error):
    code, status, default_message = "KeyTooLongError", 400, "Your key is too long"


@_register
class MalformedTrailerError(S3Error):
    code, status = "MalformedTrailerError", 400
    default_message = (
        "The request contained trailing data that was not well-formed or did not conform "
        "to our published schema."
    )


@_register
class MalformedXML(S3Error):
    code, status = "MalformedXML", 400
    default_message = (
        "The XML you provided was not well-formed or did not validate against our "
        "published schema"
    )


@_register
class MaxMessageLengthExceeded(S3Error):
    code, status, default_message = "MaxMessageLengthExceeded", 400, "Your request was too big."


@_register
class MetadataTooLarge(S3Error):
    code, status = "MetadataTooLarge", 400
    default_message = "Your metadata headers exceed the maximum allowed metadata size."


@_register
class MethodNotAllowed(S3Error):
    code, status = "MethodNotAllowed", 405
    default_message = "The specified method is not allowed against this resource."


@_register
class MissingContentLength(S3Error):
    code, status = "MissingContentLength", 411
    default_message = "You must provide the Content-Length HTTP header."


@_register
class MissingRequestBodyError(S3Error):
    code, status, default_message = "MissingRequestBodyError", 400, "Request Body is empty"


@_register
class NoSuchBucket(S3Error):
    code, status, default_message = "NoSuchBucket", 404, "The specified bucket does not exist"


@_register
class NoSuchKey(S3Error):
    code, status, default_message = "NoSuchKey", 404, "The specified key does not exist."


@_register
class NoSuchUpload(S3Error):
    code, status = "NoSuchUpload", 404
    default_message = (
        "The specified upload does not exist. The upload ID may be invalid, or the upload "
        "may have been aborted or completed."
    )


@_register
class NoSuchVersion(S3Error):
    code, status = "NoSuchVersion", 404
    default_message = "The specified version does not exist."


@_register
class NotImplementedS3(S3Error):
    code, status = "NotImplemented", 501
    default_message = "A header you provided implies functionality that is not implemented"


@_register
class NotModified(S3Error):
    code, status, default_message = "NotModified", 304, "Not Modified"


@_register
class PreconditionFailed(S3Error):
    code, status = "PreconditionFailed", 412
    default_message = "At least one of the pre-conditions you specified did not hold"


@_register
class RequestTimeout(S3Error):
    code, status = "RequestTimeout", 400
    default_message = (
        "Your socket connection to the server was not read from or written to within "
        "the timeout period."
    )


@_register
class RequestTimeTooSkewed(S3Error):
    code, status = "RequestTimeTooSkewed", 403
    default_message = (
        "The difference between the request time and the current time is too large."
    )


@_register
class ServiceUnavailable(S3Error):
    code, status, default_message = "ServiceUnavailable", 503, "Please reduce your request rate."


@_register
class SignatureDoesNotMatch(S3Error):
    code, status = "SignatureDoesNotMatch", 403
    default_message = (
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method."
    )


@_register
class SlowDown(S3Error):
    code, status, default_message = "SlowDown", 503, "Please reduce your request rate."


@_register
class XAmzContentSHA256Mismatch(S3Error):
    code, status = "XAmzContentSHA256Mismatch", 400
    default_message = "The provided 'x-amz-content-sha256' header does not match what was computed."
