"""
The S3-compatible front end's codec: pure functions and small state
machines with no I/O, on which the Twisted adapter is built.

Everything here takes bytes or str and returns typed values; every
refusal is an L{koboldfs.s3.errors.S3Error} carrying the S3 error code
that clients act on.  Nothing imports the reactor, twisted.web or the
server, and nothing reads the clock: time sources are passed in.

  - L{errors}: S3 error codes as exceptions, and the XML error document;
  - L{headers}: request headers as received, and the date formats;
  - L{sigv4}: AWS Signature Version 4 (Authorization header, presigned
    query strings, chunk and trailer signatures), and version 2 for the
    presigned URLs boto3 makes by default;
  - L{chunked}: an incremental aws-chunked decoder;
  - L{checksums}: MD5, SHA-1, SHA-256, CRC32, CRC32C, CRC64NVME, and one
    verifier of every digest a body carries;
  - L{xml}: bounded, safe parsing of request bodies and rendering of
    responses;
  - L{request}: an incoming request as an S3 operation, Range,
    conditional requests and C{response-*} overrides.

docs/s3-wire.md records what real clients send.
"""
