"""
A real nginx for tests and benchmarks, configured with docs/nginx.conf (or
docs/nginx-hmac.conf).

The shipped example is used as it is, but for the lines marked C{test:}
(listen, root, the namespace keys, the njs script), and wrapped in the
C{events} and C{http} blocks that a Debian install has in
/etc/nginx/nginx.conf.
nginx runs in the foreground (C{daemon off}), with every file it writes
under its own prefix directory.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess

from koboldfs.test.cluster import CHECKOUT
from koboldfs.test.support import free_port

#: The nginx binary to test with: set by .ci/run.
NGINX = os.environ.get("KOBOLDFS_TEST_NGINX")

#: Why nginx tests are skipped without it.
NO_NGINX = "no nginx: set KOBOLDFS_TEST_NGINX to its binary (.ci/run installs Debian's)"

EXAMPLE = os.path.join(CHECKOUT, "docs", "nginx.conf")
#: The variant that checks HMAC-SHA256 signatures with njs.
EXAMPLE_HMAC = os.path.join(CHECKOUT, "docs", "nginx-hmac.conf")
SCRIPT = os.path.join(CHECKOUT, "docs", "koboldfs.js")

#: Debian's njs module (libnginx-mod-http-js), which EXAMPLE_HMAC needs.
NJS_MODULE = os.environ.get(
    "KOBOLDFS_TEST_NGINX_JS", "/usr/lib/nginx/modules/ngx_http_js_module.so"
)
NO_NJS = f"no njs module at {NJS_MODULE}: apt-get install libnginx-mod-http-js"

_MIME_TYPES = "/etc/nginx/mime.types"


def site_config(example: str, port: int, root: str, keys_file: str) -> str:
    """
    The site C{example} with its C{test:} lines pointed at this port, data
    directory, keys file, and this checkout's njs script.

    @raise ValueError: the example no longer has exactly those lines.
    """
    with open(example) as f:
        text = f.read()
    replacements = [
        (r"include \S+;  # test: replaced", f'include "{keys_file}";', 1),
        (r"listen \S+;  # test: replaced", f"listen 127.0.0.1:{port};", 1),
        (r"root \S+;  # test: replaced", f'root "{root}";', 1),
        (
            r"js_import kobold from \S+;  # test: replaced",
            f'js_import kobold from "{SCRIPT}";',
            1 if example == EXAMPLE_HMAC else 0,
        ),
    ]
    for pattern, line, expected in replacements:
        text, count = re.subn(pattern, lambda _, line=line: line, text)
        if count != expected:
            raise ValueError(f"{example}: {count} lines match {pattern!r}, not {expected}")
    return text


class NginxProcess:
    """
    One nginx serving the data directory C{root} on a free loopback port.

    @ivar keys: namespace -> what the example's map wants: the nginx key
        (L{koboldfs.urls.nginx_key}) for EXAMPLE, the secret for
        EXAMPLE_HMAC.
    @ivar url: its base URL, for C{--public-url}.
    """

    def __init__(
        self,
        prefix: str,
        root: str,
        keys: dict[str, str] | None = None,
        binary: str | None = None,
        example: str = EXAMPLE,
    ) -> None:
        self.binary = binary or NGINX
        self.example = example
        self.prefix = os.path.abspath(prefix)
        os.makedirs(self.prefix, exist_ok=True)
        self.root = os.path.abspath(root)
        self.keys = keys or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = os.path.join(self.prefix, "nginx.conf")
        self.error_log = os.path.join(self.prefix, "error.log")
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        """
        Write the namespace keys file and the whole configuration.
        """
        keys_file = os.path.join(self.prefix, "keys.map")
        with open(keys_file, "w") as f:
            f.writelines(f'{ns} "{key}";\n' for ns, key in self.keys.items())
        temp = {
            name: os.path.join(self.prefix, name)
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        }
        types = f"include {_MIME_TYPES};" if os.path.exists(_MIME_TYPES) else ""
        # Run as root, nginx would switch its workers to "nobody", who may
        # not read a test's data directory.
        user = "user root;" if os.geteuid() == 0 else ""
        if self.example == EXAMPLE_HMAC:
            user += f"\nload_module {NJS_MODULE};"
        with open(self.conf, "w") as f:
            f.write(
                f"{user}\nworker_processes 1;\nevents {{ worker_connections 512; }}\nhttp {{\n"
                f"{types}\ndefault_type application/octet-stream;\n"
                + "".join(f'{name}_temp_path "{path}";\n' for name, path in temp.items())
                + site_config(self.example, self.port, self.root, keys_file)
                + "}\n"
            )

    def argv(self) -> list[str]:
        assert self.binary is not None, NO_NGINX
        pid = os.path.join(self.prefix, "nginx.pid")
        directives = f"daemon off; pid {pid}; error_log {self.error_log} info;"
        return [self.binary, "-p", self.prefix, "-c", self.conf, "-g", directives]

    def launch(self) -> None:
        """
        Check the configuration, then start nginx (not yet listening).

        @raise RuntimeError: nginx refused the configuration.
        """
        self.write_config()
        check = subprocess.run([*self.argv(), "-t"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
        self.process = subprocess.Popen(self.argv(), stderr=subprocess.DEVNULL)

    def listening(self) -> bool:
        """
        Whether nginx accepts connections yet.

        @raise RuntimeError: it exited.
        """
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"nginx exited {self.process.returncode}:\n{self.tail()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        except OSError:
            return False
        return True

    def tail(self) -> str:
        try:
            with open(self.error_log, errors="replace") as f:
                return "".join(f.readlines()[-20:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """
        Stop at once (SIGTERM: "fast shutdown"), and reap it.
        """
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
