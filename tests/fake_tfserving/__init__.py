"""A stand-in for TF Serving's ``tensorflow_model_server`` binary, for tests on machines without it.

``server.py`` takes the real binary's flags and serves TF Serving's real gRPC services from the
``tensorflow-serving-api`` protos with TensorFlow; :func:`install_fake_tfserving` puts it on a
``PATH`` directory under the real binary's name, so code that launches the binary runs it unchanged.
"""

from __future__ import annotations

import pathlib
import sys

SERVER_SCRIPT = pathlib.Path(__file__).resolve().with_name("server.py")
BINARY_NAME = "tensorflow_model_server"
_MAX_SHEBANG_CHARS = 200  # Linux reads at most 255 bytes of a #! line


def _launcher(interpreter: str) -> str:
    if len(interpreter) <= _MAX_SHEBANG_CHARS and not any(c.isspace() for c in interpreter):
        return (
            f"#!{interpreter}\n"
            "import runpy\n"
            "import sys\n\n"
            f"sys.argv[0] = {str(SERVER_SCRIPT)!r}\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n"
        )
    # An interpreter path the kernel cannot take on a #! line: go through sh instead.
    quoted = interpreter.replace("'", "'\\''")
    return f"#!/bin/sh\nexec '{quoted}' '{SERVER_SCRIPT}' \"$@\"\n"


def install_fake_tfserving(bin_dir: pathlib.Path) -> pathlib.Path:
    """Write an executable named ``tensorflow_model_server`` into bin_dir that runs server.py with
    this interpreter (shebang = sys.executable); return its path."""
    bin_dir = pathlib.Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / BINARY_NAME
    path.write_text(_launcher(sys.executable))
    path.chmod(0o755)
    return path
