"""Server reflection under both protocol names, `grpc.reflection.v1` and `v1alpha`, so that
grpcurl, ghz and `buf curl` work with no `.proto` files.

grpcio-reflection serves only `v1alpha`, and its descriptor pool (upb) does not find the
file of a method (`runservice.v1.RunService.StartRun`), which is the first thing ghz and
`grpcurl describe` ask for. The two protocols' messages are identical field for field and
differ only in their package, so one servicer, speaking the `v1alpha` message classes,
answers under both service names. Reflection describes a pool of its own: the served
services' files, their dependencies and a `v1` reflection file derived from the `v1alpha`
one; nothing else the process happens to have loaded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from google.rpc import error_details_pb2  # noqa: F401  (puts DETAIL_TYPES in the default pool)
from grpc_reflection.v1alpha import reflection_pb2 as pb

Request = pb.ServerReflectionRequest
Response = pb.ServerReflectionResponse

V1ALPHA_SERVICE = pb.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1_OPTIONS = descriptor_pb2.FileOptions(
    java_package="io.grpc.reflection.v1",
    java_outer_classname="ServerReflectionProto",
    java_multiple_files=True,
    go_package="google.golang.org/grpc/reflection/grpc_reflection_v1",
)
_METHOD = "ServerReflectionInfo"


DETAIL_TYPES = ("google.rpc.ErrorInfo",)
"""Messages that travel in error details (`google.rpc.Status.details`, an Any): described
too, so that grpcurl and `buf curl` print them rather than "not recognized"."""


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection for `service_names` (and itself, both versions) on `server`, and
    for the messages of error details (DETAIL_TYPES).

    The handlers are registered as they are, unauthenticated: reflection stays open.
    KeyError when a service is not in the default descriptor pool (a wiring bug).
    """
    names = (*service_names, V1_SERVICE, V1ALPHA_SERVICE)
    servicer = ReflectionServicer(names, reflection_pool(names, DETAIL_TYPES))
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=Request.FromString,
        response_serializer=Response.SerializeToString,
    )
    for service in (V1_SERVICE, V1ALPHA_SERVICE):
        handlers = {_METHOD: handler}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)


def reflection_pool(
    service_names: Iterable[str], message_names: Iterable[str] = ()
) -> descriptor_pool.DescriptorPool:
    """A pool of the files that define `service_names` and `message_names`, with their
    dependencies, copied from the default pool; the `v1` reflection service's file is
    derived from `v1alpha`'s."""
    source = descriptor_pool.Default()
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    for name in service_names:
        if name == V1_SERVICE:
            _add(pool, _v1_file(), added)
        else:
            _add_with_dependencies(pool, source.FindServiceByName(name).file, added)
    for name in message_names:
        _add_with_dependencies(pool, source.FindMessageTypeByName(name).file, added)
    return pool


def _add_with_dependencies(
    pool: descriptor_pool.DescriptorPool, file: FileDescriptor, added: set[str]
) -> None:
    for dependency in file.dependencies:
        _add_with_dependencies(pool, dependency, added)
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    _add(pool, proto, added)


def _add(
    pool: descriptor_pool.DescriptorPool,
    proto: descriptor_pb2.FileDescriptorProto,
    added: set[str],
) -> None:
    if proto.name not in added:
        pool.AddSerializedFile(proto.SerializeToString())
        added.add(proto.name)


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """`grpc/reflection/v1/reflection.proto`: the `v1alpha` file under the `v1` package."""
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name, proto.package = _V1_FILE, "grpc.reflection.v1"
    proto.options.CopyFrom(_V1_OPTIONS)
    for message in proto.message_type:  # the file has no nested types
        for field in message.field:
            if field.HasField("type_name"):  # proto2: assigning "" would set it
                field.type_name = field.type_name.replace(old, new, 1)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, new, 1)
        method.output_type = method.output_type.replace(old, new, 1)
    return proto


class ReflectionServicer:
    """Answers reflection requests from one descriptor pool, one answer per request."""

    def __init__(self, service_names: Iterable[str], pool: descriptor_pool.DescriptorPool):
        self._services = sorted(set(service_names))
        self._pool = pool

    async def ServerReflectionInfo(
        self,
        requests: AsyncIterator[Request],
        _context: grpc.aio.ServicerContext[Request, Response],
    ) -> AsyncIterator[Response]:
        """The answer to each request in order; failures are answers, never call errors."""
        async for request in requests:
            yield self.answer(request)

    def answer(self, request: Request) -> Response:
        """The response to one request: files, extension numbers, services or an error."""
        try:
            response = self._answer(request)
        except KeyError:
            response = _error(grpc.StatusCode.NOT_FOUND, f"not found: {_subject(request)}")
        response.valid_host = request.host
        response.original_request.CopyFrom(request)
        return response

    def _answer(self, request: Request) -> Response:
        kind = request.WhichOneof("message_request")
        if kind == "file_by_filename":
            return _files(self._pool.FindFileByName(request.file_by_filename))
        if kind == "file_containing_symbol":
            return _files(self.file_containing_symbol(request.file_containing_symbol))
        if kind == "file_containing_extension":
            asked = request.file_containing_extension
            message = self._pool.FindMessageTypeByName(asked.containing_type)
            extension = self._pool.FindExtensionByNumber(message, asked.extension_number)
            return _files(self.file_containing_symbol(extension.full_name))
        if kind == "all_extension_numbers_of_type":
            return self._extension_numbers(request.all_extension_numbers_of_type)
        if kind == "list_services":
            services = [pb.ServiceResponse(name=name) for name in self._services]
            return Response(list_services_response=pb.ListServiceResponse(service=services))
        return _error(grpc.StatusCode.INVALID_ARGUMENT, "the request asks for nothing known")

    def file_containing_symbol(self, symbol: str) -> FileDescriptor:
        """The file defining `symbol`: a message, field, enum, enum value, service, method
        or extension. KeyError when there is none."""
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            # upb's pool does not index methods: find the service, then the method in it.
            service_name, _, method = symbol.rpartition(".")
            service = self._pool.FindServiceByName(service_name)
            if method not in service.methods_by_name:
                raise
            return service.file

    def _extension_numbers(self, type_name: str) -> Response:
        message = self._pool.FindMessageTypeByName(type_name)
        numbers = sorted(e.number for e in self._pool.FindAllExtensions(message))
        return Response(
            all_extension_numbers_response=pb.ExtensionNumberResponse(
                base_type_name=message.full_name, extension_number=numbers
            )
        )


def _files(file: FileDescriptor) -> Response:
    """`file` first, then every file it depends on, directly or not (each once)."""
    found: dict[str, FileDescriptor] = {}
    pending = [file]
    while pending:
        current = pending.pop()
        if current.name not in found:
            found[current.name] = current
            pending.extend(current.dependencies)
    serialized = []
    for each in found.values():
        proto = descriptor_pb2.FileDescriptorProto()
        each.CopyToProto(proto)
        serialized.append(proto.SerializeToString())
    return Response(
        file_descriptor_response=pb.FileDescriptorResponse(file_descriptor_proto=serialized)
    )


def _error(code: grpc.StatusCode, message: str) -> Response:
    number: int = code.value[0]
    return Response(error_response=pb.ErrorResponse(error_code=number, error_message=message))


def _subject(request: Request) -> str:
    kind = request.WhichOneof("message_request") or "nothing"
    value = getattr(request, kind, "")
    return f"{kind} {value}".strip() if isinstance(value, str) else kind
