"""
Authentication: namespace keys, the cluster secret, and the challenge-
response both are proved with (docs/security.md).

A client key is C{kfs1.<key id>.<secret>}: the id names the key in the
metadata, the secret never leaves the client.  The server stores only
C{StoredKey = SHA-256(ClientKey)}, where C{ClientKey = HMAC(secret,
"koboldfs client key")}; a client proves it holds the key as SCRAM does
(RFC 5802): C{proof = ClientKey XOR HMAC(StoredKey, message)}, and the
server checks C{SHA-256(proof XOR HMAC(StoredKey, message)) == StoredKey}.
The message binds the server's nonce and the client's, so a proof is good
on one connection only, and a copy of the database does not let anyone
authenticate.

Servers prove the cluster secret to each other with C{HMAC(secret,
message)}; every server holds it, so it needs no stored form.

Everything here is pure computation on short strings: cheap enough for the
reactor thread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from koboldfs.errors import InvalidName

#: Prefix and version of the key format.
KEY_PREFIX = "kfs1"
_KEY = re.compile(r"kfs1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})\Z")
_CLIENT_KEY_LABEL = b"koboldfs client key"
#: Shortest cluster secret accepted, in bytes.
MIN_SECRET = 16
NONCE_BYTES = 32


class InvalidKeyFormat(InvalidName):
    """
    A string that is not a KoboldFS client key.
    """


@dataclass(frozen=True)
class NewKey:
    """
    A key just made: C{key} is shown to its owner once; C{stored_key} is
    all the metadata keeps.
    """

    key: str
    key_id: str
    stored_key: str


@dataclass(frozen=True)
class KeyInfo:
    """
    A namespace key as the metadata stores it.
    """

    namespace: str
    key_id: str
    stored_key: str
    readonly: bool
    created: float


@dataclass(frozen=True)
class Grant:
    """
    What a connection may do, once authenticated: the one place request
    handlers ask.

    @ivar namespace: the namespace it may touch, or None for all (peers,
        and every client of an open server).
    @ivar write: whether it may put and delete.
    @ivar peer: whether it is another server of the cluster.
    @ivar key_id: the namespace key it was earned with, or None: while it
        lasts, its server checks now and then that the key is not revoked.
    """

    namespace: str | None
    write: bool
    peer: bool = False
    key_id: str | None = None

    def allows(self, namespace: str, write: bool) -> bool:
        return (self.namespace is None or self.namespace == namespace) and (self.write or not write)


#: What a connection to an open server may do.
OPEN = Grant(None, True)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _client_key(secret: str) -> bytes:
    return hmac.new(secret.encode("ascii"), _CLIENT_KEY_LABEL, hashlib.sha256).digest()


def new_key() -> NewKey:
    """
    A fresh random client key.
    """
    key_id = secrets.token_hex(8)
    secret = _b64(secrets.token_bytes(32))
    return NewKey(
        f"{KEY_PREFIX}.{key_id}.{secret}",
        key_id,
        hashlib.sha256(_client_key(secret)).hexdigest(),
    )


def parse_key(key: object) -> tuple[str, str]:
    """
    C{(key_id, secret)} of a client key.

    @raise InvalidKeyFormat: not a key made by L{new_key}.
    """
    match = _KEY.match(key) if isinstance(key, str) else None
    if match is None:
        raise InvalidKeyFormat("not a KoboldFS key: keys look like kfs1.<16 hex>.<43 characters>")
    return match.group(1), match.group(2)


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def auth_message(
    method: str, server_nonce: str, client_nonce: str, server: str, subject: str
) -> bytes:
    """
    What a proof signs: both nonces (so it is good on one connection
    only), the server's name, and who is authenticating (C{namespace/key
    id} for a key, the peer's name for the cluster secret).
    """
    parts = ("koboldfs-auth-1", method, server_nonce, client_nonce, server, subject)
    return "\0".join(parts).encode("utf-8")


def key_proof(secret: str, message: bytes) -> str:
    """
    The client's proof that it holds the key whose secret is C{secret}.
    """
    client_key = _client_key(secret)
    stored = hashlib.sha256(client_key).digest()
    signature = hmac.new(stored, message, hashlib.sha256).digest()
    return bytes(a ^ b for a, b in zip(client_key, signature, strict=True)).hex()


def check_key_proof(stored_key: str, message: bytes, proof: str) -> bool:
    """
    Whether C{proof} was made with the key stored as C{stored_key}.
    """
    try:
        stored = bytes.fromhex(stored_key)
        proof_bytes = bytes.fromhex(proof)
    except ValueError:
        return False
    if len(proof_bytes) != 32 or len(stored) != 32:
        return False
    signature = hmac.new(stored, message, hashlib.sha256).digest()
    client_key = bytes(a ^ b for a, b in zip(proof_bytes, signature, strict=True))
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), stored)


def cluster_proof(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def check_cluster_proof(secrets_: tuple[bytes, ...], message: bytes, proof: str) -> bool:
    """
    Whether C{proof} was made with any of the cluster secrets (several
    during a rotation).
    """
    good = False
    for secret in secrets_:
        good |= hmac.compare_digest(cluster_proof(secret, message), proof)
    return good


def read_secret_file(path: str) -> tuple[bytes, ...]:
    """
    The cluster secrets in C{path}, one a line: the first is the one this
    server proves; every one is accepted from peers (for rotation).
    Blank lines and lines starting with C{#} are skipped.

    @raise ValueError: unreadable, empty, or a secret shorter than
        L{MIN_SECRET} bytes.
    """
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read --secret-file {path}: {e.strerror}") from None
    found = tuple(s for s in (line.strip() for line in lines) if s and not s.startswith(b"#"))
    if not found:
        raise ValueError(f"--secret-file {path} holds no secret")
    for secret in found:
        if len(secret) < MIN_SECRET:
            raise ValueError(f"--secret-file {path}: secrets are at least {MIN_SECRET} bytes")
    return found


@dataclass(frozen=True)
class Credentials:
    """
    What a client proves on each connection: a namespace key, or (for
    servers replicating) the cluster secret with the server's name.
    """

    namespace: str | None = None
    key: str | None = None
    cluster_secret: bytes | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.key is not None:
            parse_key(self.key)

    def fields(self, server_nonce: str, server: str) -> dict[str, str]:
        """
        The fields of an AUTH frame answering WELCOME's C{server_nonce}.
        """
        client_nonce = new_nonce()
        if self.cluster_secret is not None:
            message = auth_message("cluster", server_nonce, client_nonce, server, self.name)
            return {
                "method": "cluster",
                "peer": self.name,
                "cnonce": client_nonce,
                "proof": cluster_proof(self.cluster_secret, message),
            }
        assert self.key is not None and self.namespace is not None
        key_id, secret = parse_key(self.key)
        message = auth_message(
            "key", server_nonce, client_nonce, server, f"{self.namespace}/{key_id}"
        )
        return {
            "method": "key",
            "ns": self.namespace,
            "key_id": key_id,
            "cnonce": client_nonce,
            "proof": key_proof(secret, message),
        }


def is_local_endpoint(description: str) -> bool:
    """
    Whether a strports server endpoint is reachable from this machine only:
    a Unix socket, or TCP/TLS bound to a loopback interface.
    """
    kind = description.partition(":")[0]
    if kind == "unix":
        return True
    match = re.search(r"(?:^|:)interface=([^:]+)", description.replace("\\:", "\x00"))
    if match is None:
        return False
    interface = match.group(1).replace("\x00", ":")
    return interface in ("localhost", "::1") or interface.startswith("127.")


# -- S3 credentials (docs/security.md, "S3 credentials")

#: What the key that seals S3 secrets is derived for, and the sealed form's
#: version.
_S3_SEAL_INFO = b"koboldfs s3 credential sealing key v1"
_S3_SEALED = "s3seal1"
_S3_KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
#: An access key id: "KFS" and 17 base-32 characters, 20 as AWS's are.
S3_ACCESS_KEY = re.compile(r"KFS[A-Z2-7]{17}\Z")


def new_s3_credential() -> tuple[str, str]:
    """
    A fresh C{(access key id, secret)}: 85 random bits name it, 240 are
    the secret (40 URL-safe characters, as long as AWS's).
    """
    access_key = "KFS" + "".join(secrets.choice(_S3_KEY_ALPHABET) for _ in range(17))
    return access_key, secrets.token_urlsafe(30)


def _s3_sealing_key(cluster_secret: bytes) -> bytes:
    """
    HKDF-SHA256 of a cluster secret, for sealing S3 secrets only.
    """
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_S3_SEAL_INFO).derive(
        cluster_secret
    )


def _key_tag(key: bytes) -> str:
    """
    Which sealing key sealed a secret (so that opening tries the right
    one first), revealing nothing of it.
    """
    return hmac.new(key, b"key tag", hashlib.sha256).hexdigest()[:8]


def seal_s3_secret(cluster_secret: bytes, access_key: str, secret: str) -> str:
    """
    The stored form of an S3 secret: AES-256-GCM under a key derived from
    C{cluster_secret}, bound to C{access_key} (the additional data, so a
    sealed secret copied to another credential's row does not open).
    SigV4 needs the secret itself, so it cannot be kept as a hash.
    """
    key = _s3_sealing_key(cluster_secret)
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(key).encrypt(nonce, secret.encode("utf-8"), access_key.encode("ascii"))
    return f"{_S3_SEALED}.{_key_tag(key)}.{_b64(nonce + sealed)}"


def open_s3_secret(cluster_secrets: tuple[bytes, ...], access_key: str, sealed: str) -> str | None:
    """
    The secret L{seal_s3_secret} sealed, opened with whichever of
    C{cluster_secrets} sealed it (several during a rotation); None if
    none did, or the sealed form was changed.
    """
    try:
        version, tag, body = sealed.split(".")
        data = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        return None
    if version != _S3_SEALED or len(data) < 12 + 16:
        return None
    for cluster_secret in cluster_secrets:
        key = _s3_sealing_key(cluster_secret)
        if _key_tag(key) != tag:
            continue
        try:
            secret = AESGCM(key).decrypt(data[:12], data[12:], access_key.encode("ascii"))
        except InvalidTag:
            return None
        return secret.decode("utf-8")
    return None
