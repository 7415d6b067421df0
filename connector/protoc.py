"""``.proto`` source to descriptors, with protoc as ``grpcio-tools`` packages it.

protobuf's Python runtime builds message classes from descriptors only. A registry that
stores a Protobuf schema as ``.proto`` text and cannot serve it as a descriptor (Apicurio's
Confluent-compatible API: its ``format=serialized`` answer is not usable) leaves the text;
Google's own compiler turns it into descriptors, in process, once per schema id (about
10 ms). Pure: temporary files only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path, PurePosixPath

from google.protobuf import descriptor_pb2


class ProtocError(ValueError):
    """The sources do not compile (protoc writes its reasons to the process's stderr)."""


def compile_sources(sources: dict[str, str], main: str) -> list[descriptor_pb2.FileDescriptorProto]:
    """Descriptors of ``main`` and every file it imports, dependencies first. ``sources``:
    file name (as imported) -> ``.proto`` text; the well-known types are built in."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as exc:  # an install without it: say what to add
        raise ProtocError("compiling .proto source needs the grpcio-tools package") from exc
    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="schema-") as work:
        root = Path(work) / "src"
        for name, text in sources.items():
            relative = PurePosixPath(name)
            if relative.is_absolute() or ".." in relative.parts:
                raise ProtocError(f"a schema reference named {name!r} is not a relative path")
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        out = Path(work) / "set.pb"
        code = protoc.main(
            [
                "protoc",
                f"-I{root}",
                f"-I{include}",
                "--include_imports",
                f"--descriptor_set_out={out}",
                main,
            ]
        )
        if code != 0 or not out.exists():
            raise ProtocError(f"protoc could not compile the .proto source (exit {code})")
        return list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)
