"""
Authentication: namespace keys and the cluster secret, proved by
challenge-response (koboldfs.auth), against the real server in memory.
"""

from __future__ import annotations

import io
import os
from typing import Any

from sqlalchemy import create_engine, text
from twisted.internet.testing import StringTransport
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from koboldfs import auth
from koboldfs.errors import AuthRequired, ErrorCode, Forbidden, Unavailable
from koboldfs.protocol import VERSION, FrameDecoder, Op, encode_data, encode_message
from koboldfs.binaryserver import ServerFactory, ServerProtocol
from koboldfs.storage import relpath_for
from koboldfs.tap import Options
from koboldfs.testing import MemoryCluster, MemoryServer


class KeyTests(SynchronousTestCase):
    """
    The key format and the proofs, with no server.
    """

    def test_proof(self) -> None:
        """
        A proof made with the key checks against its stored form, and not
        against another key's, nor for another message.
        """
        made, other = auth.new_key(), auth.new_key()
        key_id, secret = auth.parse_key(made.key)
        self.assertEqual(key_id, made.key_id)
        self.assertNotIn(secret, made.stored_key)
        message = auth.auth_message("key", "n" * 64, "c" * 64, "s", f"ns/{key_id}")
        proof = auth.key_proof(secret, message)
        self.assertTrue(auth.check_key_proof(made.stored_key, message, proof))
        self.assertFalse(auth.check_key_proof(other.stored_key, message, proof))
        self.assertFalse(auth.check_key_proof(made.stored_key, message + b"x", proof))
        self.assertFalse(auth.check_key_proof(made.stored_key, message, "zz"))
        # The stored form is not a proof: a copy of the database is no key.
        self.assertFalse(auth.check_key_proof(made.stored_key, message, made.stored_key))

    def test_badKeys(self) -> None:
        for bad in ("", "kfs1", "kfs1.xyz.abc", auth.new_key().key + "x", None, 3):
            self.assertRaises(auth.InvalidKeyFormat, auth.parse_key, bad)

    def test_localEndpoint(self) -> None:
        for local in (
            "tcp:9876:interface=127.0.0.1",
            "ssl:9876:privateKey=k.pem:interface=127.0.0.2",
            r"tcp6:9876:interface=\:\:1",
            "unix:/run/kobold.sock",
        ):
            self.assertTrue(auth.is_local_endpoint(local), local)
        for remote in ("tcp:9876", "tcp:9876:interface=0.0.0.0", "tcp:9876:interface=10.0.0.1"):
            self.assertFalse(auth.is_local_endpoint(remote), remote)

    def test_secretFile(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"# new first, old second\n" + b"a" * 20 + b"\n\n" + b"b" * 16 + b"\n")
        self.assertEqual(auth.read_secret_file(path), (b"a" * 20, b"b" * 16))
        with open(path, "wb") as f:
            f.write(b"short\n")
        self.assertRaises(ValueError, auth.read_secret_file, path)
        self.assertRaises(ValueError, auth.read_secret_file, path + ".missing")


class _KeysServer:
    def setUp(self) -> None:
        self.server = MemoryServer(os.path.abspath(self.mktemp()))
        self.server.config.auth = "keys"
        self.server.start()
        self.addCleanup(self.server.stop)
        self.rw = self.server.flush(self.server.store.create_key("ns"))
        self.ro = self.server.flush(self.server.store.create_key("ns", readonly=True))


class ClientAuthTests(_KeysServer, SynchronousTestCase):
    """
    The Deferred client with keys, wrong keys, no key, read-only keys.
    """

    def test_readWrite(self) -> None:
        s = self.server
        client = s.client("ns", key=self.rw)
        self.assertTrue(s.flush(client.ping()))
        self.assertTrue(s.flush(client.put("a", b"body")))
        out = io.BytesIO()
        self.assertTrue(s.flush(client.get("a", out)))
        self.assertEqual(out.getvalue(), b"body")
        self.assertTrue(s.flush(client.delete("a")))
        s.flush(client.close())

    def test_noKey(self) -> None:
        """
        Without a key, a server that requires one is refused with a clear
        error (no retries), and the server goes on serving others.
        """
        s = self.server
        client = s.client("ns")
        error = self.assertRaises(AuthRequired, s.flush, client.put("a", b"x"))
        self.assertIn("key=", str(error))
        self.assertRaises(AuthRequired, s.flush, client.ping())
        self.assertTrue(s.flush(s.client("ns", key=self.rw).put("a", b"x")))

    def test_wrongKey(self) -> None:
        """
        An unknown key, a known id with a wrong secret, and a key of
        another namespace are all refused; others are still served.
        """
        s = self.server
        key_id, _ = auth.parse_key(self.rw)
        forged = f"kfs1.{key_id}.{auth.parse_key(auth.new_key().key)[1]}"
        other = s.flush(s.store.create_key("other"))
        for key in (auth.new_key().key, forged, other):
            client = s.client("ns", key=key)
            error = self.assertRaises(Forbidden, s.flush, client.stat("a"))
            self.assertEqual(error.code, ErrorCode.FORBIDDEN)
        self.assertIsNone(s.flush(s.client("ns", key=self.ro).stat("a")))

    def test_readOnly(self) -> None:
        """
        A read-only key gets, stats, lists and gets URLs; put and delete
        are refused with a clear error, and the connection goes on.
        """
        s = self.server
        self.assertTrue(s.flush(s.client("ns", key=self.rw).put("a", b"body")))
        client = s.client("ns", key=self.ro)
        out = io.BytesIO()
        self.assertTrue(s.flush(client.get("a", out)))
        self.assertEqual(out.getvalue(), b"body")
        self.assertEqual(s.flush(client.stat("a")).size, 4)
        self.assertEqual(s.flush(client.list()), ["a"])
        self.assertTrue(s.flush(client.get_url("a")).startswith("http://memory/files/"))
        error = self.assertRaises(Forbidden, s.flush, client.put("b", os.urandom(3_000_000)))
        self.assertEqual(str(error), "FORBIDDEN: this key is read-only: no put or delete")
        self.assertRaises(Forbidden, s.flush, client.delete("a"))
        self.assertEqual(s.flush(client.list()), ["a"])
        self.assertEqual(len(s.pumps), 2)  # one connection per client all along

    def test_revoked(self) -> None:
        s = self.server
        key_id, _ = auth.parse_key(self.ro)
        self.assertEqual([k.key_id for k in s.flush(s.store.keys("ns"))].count(key_id), 1)
        self.assertTrue(s.flush(s.store.revoke_key("ns", key_id)))
        self.assertFalse(s.flush(s.store.revoke_key("ns", key_id)))
        self.assertRaises(Forbidden, s.flush, s.client("ns", key=self.ro).stat("a"))

    def test_badKeyRefusedBeforeSending(self) -> None:
        self.assertRaises(ValueError, self.server.client, "ns", key="secret")


class HandshakeTests(_KeysServer, SynchronousTestCase):
    """
    The AUTH exchange, byte by byte.
    """

    def connect(self) -> tuple[ServerProtocol, StringTransport, dict]:
        proto = ServerProtocol(self.server.node, self.server.metrics)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.decoder = FrameDecoder()
        proto.dataReceived(encode_message(Op.HELLO, {"versions": [VERSION]}))
        [welcome] = self.frames(transport)
        self.assertEqual(welcome.op, Op.WELCOME)
        self.assertTrue(welcome["auth"])
        return proto, transport, welcome.fields

    def frames(self, transport: StringTransport) -> list:
        data = transport.value()
        transport.clear()
        return self.decoder.feed(data)

    def test_requestBeforeAuth(self) -> None:
        proto, transport, _ = self.connect()
        proto.dataReceived(encode_message(Op.STAT, {"ns": "ns", "key": "a"}))
        [error] = self.frames(transport)
        self.assertEqual(error["code"], ErrorCode.AUTH_REQUIRED)
        self.assertTrue(transport.disconnecting)

    def test_replay(self) -> None:
        """
        An AUTH frame that worked on one connection fails on the next: the
        server's nonce differs, so the proof does not match.
        """
        proto, transport, welcome = self.connect()
        creds = auth.Credentials("ns", self.rw)
        auth_frame = encode_message(Op.AUTH, creds.fields(welcome["nonce"], welcome["server"]))
        proto.dataReceived(auth_frame)
        [ok] = self.frames(transport)
        self.assertEqual((ok.op, ok["ns"], ok["write"]), (Op.OK, "ns", True))
        proto2, transport2, welcome2 = self.connect()
        self.assertNotEqual(welcome["nonce"], welcome2["nonce"])
        proto2.dataReceived(auth_frame)
        [error] = self.frames(transport2)
        self.assertEqual(error["code"], ErrorCode.FORBIDDEN)
        self.assertTrue(transport2.disconnecting)
        # The first connection is unaffected.
        proto.dataReceived(encode_message(Op.PING))
        self.assertEqual(self.frames(transport)[0].op, Op.OK)

    def test_otherNamespace(self) -> None:
        """
        A key grants its own namespace only: another is FORBIDDEN, and the
        connection goes on.
        """
        proto, transport, welcome = self.connect()
        creds = auth.Credentials("ns", self.ro)
        proto.dataReceived(
            encode_message(Op.AUTH, creds.fields(welcome["nonce"], welcome["server"]))
        )
        self.assertEqual(self.frames(transport)[0].op, Op.OK)
        proto.dataReceived(encode_message(Op.STAT, {"ns": "other", "key": "a"}))
        self.assertEqual(self.frames(transport)[0]["code"], ErrorCode.FORBIDDEN)
        proto.dataReceived(encode_message(Op.PUT, {"ns": "ns", "key": "a"}))
        self.assertEqual(self.frames(transport)[0]["code"], ErrorCode.FORBIDDEN)
        proto.dataReceived(encode_message(Op.END, {"abort": True}))
        proto.dataReceived(encode_message(Op.STAT, {"ns": "ns", "key": "a"}))
        self.assertEqual(self.frames(transport)[0]["code"], ErrorCode.NOT_FOUND)
        self.assertFalse(transport.disconnecting)

    def test_replicaPutForPeersOnly(self) -> None:
        """
        A client with a read-write key cannot leave bytes with REPLICA_PUT:
        it is for servers that proved the cluster secret.
        """
        proto, transport, welcome = self.connect()
        creds = auth.Credentials("ns", self.rw)
        proto.dataReceived(
            encode_message(Op.AUTH, creds.fields(welcome["nonce"], welcome["server"]))
        )
        self.assertEqual(self.frames(transport)[0].op, Op.OK)
        fid = "ab" * 16
        header = {"fid": fid, "path": relpath_for(fid, "k.txt"), "size": 4}
        proto.dataReceived(encode_message(Op.REPLICA_PUT, header))
        [error] = self.frames(transport)
        self.assertEqual(error["code"], ErrorCode.FORBIDDEN)
        self.assertIn("cluster's servers only", error["message"])
        proto.dataReceived(encode_data(b"evil") + encode_message(Op.END, {"sha256": "00" * 32}))
        proto.dataReceived(encode_message(Op.PING))
        self.assertEqual(self.frames(transport)[0].op, Op.OK)
        self.assertFalse(transport.disconnecting)
        data = os.path.join(self.server.config.data, "files")
        self.assertEqual([f for _, _, fs in os.walk(data) for f in fs], [])

    def test_clusterStatusForPeersOnly(self) -> None:
        """
        CLUSTER_STATUS tells the cluster's layout to holders of the cluster
        secret, not to a client with a namespace key, whose connection
        goes on.
        """
        proto, transport, welcome = self.connect()
        creds = auth.Credentials("ns", self.rw)
        proto.dataReceived(
            encode_message(Op.AUTH, creds.fields(welcome["nonce"], welcome["server"]))
        )
        self.assertEqual(self.frames(transport)[0].op, Op.OK)
        proto.dataReceived(encode_message(Op.CLUSTER_STATUS, {}))
        [error] = self.frames(transport)
        self.assertEqual(error["code"], ErrorCode.FORBIDDEN)
        self.assertIn("cluster secret", error["message"])
        self.server.config.cluster_secrets = (b"s" * 20,)
        proto, transport, welcome = self.connect()
        creds = auth.Credentials(cluster_secret=b"s" * 20, name="admin")
        proto.dataReceived(
            encode_message(Op.AUTH, creds.fields(welcome["nonce"], welcome["server"]))
        )
        self.assertEqual(self.frames(transport)[0].op, Op.OK)
        proto.dataReceived(encode_message(Op.CLUSTER_STATUS, {"held": True}))
        self.server.pump()
        [ok] = self.frames(transport)
        self.assertEqual(ok.op, Op.OK)
        self.assertEqual(set(ok.fields), {"now", "servers", "health", "held"})
        self.assertEqual(ok["health"]["files"], 0)

    def test_badAuthFrames(self) -> None:
        """
        Malformed AUTH frames are refused and close the connection.
        """
        for fields in (
            {"method": "magic", "cnonce": "x", "proof": "y"},
            {"method": "key", "cnonce": "x", "proof": "y"},
            {"method": "key", "ns": "no/such", "key_id": "0" * 16, "cnonce": "x", "proof": "y"},
            {"method": "cluster", "peer": "p", "cnonce": "x", "proof": "y"},
        ):
            proto, transport, _ = self.connect()
            proto.dataReceived(encode_message(Op.AUTH, fields))
            [error] = self.frames(transport)
            self.assertEqual(error.op, Op.ERROR, fields)
            self.assertTrue(transport.disconnecting, fields)

    def test_revokedWhileOpen(self) -> None:
        """
        The factory's key check ends the open connections of a revoked key,
        even one in the middle of an upload (which stores nothing), with a
        FORBIDDEN error saying so; connections of other keys and of peers
        go on.
        """
        s = self.server
        factory = ServerFactory(s.node, s.metrics)
        connections = {}
        for name, key in (("uploading", self.rw), ("idle", self.rw), ("other", self.ro)):
            proto = factory.buildProtocol(None)
            transport = StringTransport()
            proto.makeConnection(transport)
            proto.dataReceived(encode_message(Op.HELLO, {"versions": [VERSION]}))
            self.decoder = FrameDecoder()
            [welcome] = self.frames(transport)
            creds = auth.Credentials("ns", key)
            proto.dataReceived(
                encode_message(Op.AUTH, creds.fields(welcome["nonce"], welcome["server"]))
            )
            self.assertEqual(self.frames(transport)[0].op, Op.OK)
            connections[name] = (proto, transport)
        self.assertEqual(len(factory.connections), 3)
        uploading, transport = connections["uploading"]
        uploading.dataReceived(encode_message(Op.PUT, {"ns": "ns", "key": "big", "size": 8}))
        uploading.dataReceived(encode_data(b"half"))
        self.assertEqual(s.flush(factory.check_keys()), 0)  # nothing revoked yet
        self.assertFalse(transport.disconnecting)

        self.assertTrue(s.flush(s.store.revoke_key("ns", auth.parse_key(self.rw)[0])))
        self.assertEqual(s.flush(factory.check_keys()), 2)
        for name in ("uploading", "idle"):
            proto, transport = connections[name]
            [error] = self.frames(transport)
            self.assertEqual(error["code"], ErrorCode.FORBIDDEN, name)
            self.assertIn("was revoked", error["message"])
            self.assertTrue(transport.disconnecting, name)
        self.assertEqual(s.node.uploads, 0)
        self.assertIsNone(s.flush(s.store.lookup("ns", "big")))
        other, transport = connections["other"]
        self.assertFalse(transport.disconnecting)
        other.dataReceived(encode_message(Op.PING))
        self.assertEqual(self.frames(transport)[0].op, Op.OK)

    def test_openServer(self) -> None:
        """
        An open server says so in WELCOME and serves without AUTH.
        """
        self.server.config.auth = "open"
        proto = ServerProtocol(self.server.node, self.server.metrics)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.decoder = FrameDecoder()
        proto.dataReceived(
            encode_message(Op.HELLO, {"versions": [VERSION]}) + encode_message(Op.PING)
        )
        welcome, ok = self.frames(transport)
        self.assertFalse(welcome["auth"])
        self.assertEqual(ok.op, Op.OK)


class ClusterSecretTests(SynchronousTestCase):
    """
    Servers requiring keys reach each other with the cluster secret.
    """

    def cluster(self, secrets: dict[str, tuple[bytes, ...]]) -> MemoryCluster:
        cluster = MemoryCluster(os.path.abspath(self.mktemp()), list(secrets))
        self.addCleanup(cluster.stop)
        for name, server in cluster.servers.items():
            server.config.auth = "keys"
            server.config.cluster_secrets = secrets[name]
            server.node.peers._credentials = (
                auth.Credentials(cluster_secret=secrets[name][0], name=name)
                if secrets[name]
                else None
            )
        return cluster

    def test_relay(self) -> None:
        """
        A server without a copy fetches it from a peer that accepts its
        secret (any of the peer's secrets: rotation), and fails with
        UNAVAILABLE from a peer that does not.
        """
        good, old, bad = b"s" * 32, b"o" * 32, b"x" * 32
        cluster = self.cluster({"a": (good, old), "b": (old,), "c": (bad,)})
        a = cluster.servers["a"]
        key = a.flush(a.store.create_key("ns"))
        self.assertTrue(cluster.flush(a.client("ns", key=key).put("k", b"body")))
        out = io.BytesIO()
        self.assertTrue(cluster.flush(cluster.servers["b"].client("ns", key=key).get("k", out)))
        self.assertEqual(out.getvalue(), b"body")
        error = self.assertRaises(
            Unavailable,
            cluster.flush,
            cluster.servers["c"].client("ns", key=key, retries=0).get("k", io.BytesIO()),
        )
        self.assertIn("wrong cluster secret", str(error))


class SchemaTests(SynchronousTestCase):
    def test_upgrade(self) -> None:
        """
        A database made before keys existed gains their table at start.
        """
        root = os.path.abspath(self.mktemp())
        server = MemoryServer(root)
        server.start()
        server.stop()
        engine = create_engine(f"sqlite:///{os.path.join(root, 'metadata.sqlite')}")
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE client_keys"))
        engine.dispose()
        server = MemoryServer(root)
        server.start()
        self.addCleanup(server.stop)
        key = server.flush(server.store.create_key("ns", readonly=True))
        [info] = server.flush(server.store.keys("ns"))
        self.assertEqual((info.key_id, info.readonly), (auth.parse_key(key)[0], True))


class OptionsTests(SynchronousTestCase):
    """
    The server's security options, from the command line and the ini file.
    """

    def parse(self, *argv: str) -> Any:
        options = Options()
        options.parseOptions(list(argv))
        return options.server_config

    def test_modes(self) -> None:
        self.assertEqual(self.parse().auth, "auto")
        self.assertEqual(self.parse("--open").auth, "open")
        self.assertEqual(self.parse("--auth=keys").auth, "keys")
        self.assertRaises(UsageError, self.parse, "--auth=maybe")
        self.assertRaises(UsageError, self.parse, "--open", "--auth=keys")

    def test_secretFile(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("x" * 32 + "\n")
        config = self.parse(f"--secret-file={path}")
        self.assertEqual(config.cluster_secrets, (b"x" * 32,))
        self.assertNotIn("x" * 32, repr(config))
        self.assertRaises(UsageError, self.parse, f"--secret-file={path}.missing")

    def test_limits(self) -> None:
        config = self.parse("--max-uploads=3", "--frame-timeout=5", "--max-connections-per-ip=9")
        self.assertEqual(
            (config.max_uploads, config.frame_timeout, config.max_connections_per_ip), (3, 5, 9)
        )
        self.assertRaises(UsageError, self.parse, "--max-frame-size=1000")
        self.assertRaises(UsageError, self.parse, "--max-uploads=0")

    def test_ini(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[koboldfs]\nauth = open\nmax_uploads = 7\n")
        config = self.parse(f"--config={path}")
        self.assertEqual((config.auth, config.max_uploads), ("open", 7))
        with open(path, "w") as f:
            f.write("[koboldfs]\nopen = true\n")
        self.assertRaises(UsageError, self.parse, f"--config={path}")
