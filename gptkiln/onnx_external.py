"""The external-data `location`s an ONNX file points at, read from the protobuf wire format.

A bundle is checked on devices that have only the target's runtime, so this needs no `onnx`
package: it walks every place a TensorProto can sit (initializers, sparse initializers,
Constant and other tensor attributes, subgraphs, functions, training graphs) and returns
each TensorProto's external_data `location` value.
"""

from __future__ import annotations

# message -> {field number: message type of that (length-delimited) field}, from onnx/onnx.proto
TENSOR, SPARSE, GRAPH, NODE, ATTRIBUTE, FUNCTION, TRAINING, MODEL, ENTRY = range(9)
SCHEMA = {
    MODEL: {7: GRAPH, 20: TRAINING, 25: FUNCTION},
    TRAINING: {1: GRAPH, 2: GRAPH},
    GRAPH: {1: NODE, 5: TENSOR, 15: SPARSE},
    FUNCTION: {7: NODE},
    NODE: {5: ATTRIBUTE},
    ATTRIBUTE: {5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH, 22: SPARSE, 23: SPARSE},
    SPARSE: {1: TENSOR, 2: TENSOR},
    TENSOR: {13: ENTRY},
    ENTRY: {},
}


class MalformedOnnx(ValueError):
    pass


def external_locations(data: bytes) -> list[str]:
    """Every external-data location in a serialized ModelProto, in file order."""
    locations: list[str] = []
    _walk(memoryview(data), MODEL, locations)
    return locations


def _walk(buffer: memoryview, message: int, locations: list[str]) -> None:
    entry: dict[int, bytes] = {}
    for number, value in _fields(buffer):
        if message == ENTRY and isinstance(value, memoryview):
            entry[number] = bytes(value)
        elif isinstance(value, memoryview) and number in SCHEMA[message]:
            _walk(value, SCHEMA[message][number], locations)
    if message == ENTRY and entry.get(1) == b"location":
        locations.append(entry.get(2, b"").decode("utf-8", errors="replace"))


def _fields(buffer: memoryview):
    """(field number, value) pairs: ints for varint and fixed fields, memoryviews for length-delimited ones."""
    position, end = 0, len(buffer)
    while position < end:
        key, position = _varint(buffer, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(buffer, position)
        elif wire == 1:
            value, position = None, position + 8
        elif wire == 5:
            value, position = None, position + 4
        elif wire == 2:
            size, position = _varint(buffer, position)
            value, position = buffer[position:position + size], position + size
        else:
            raise MalformedOnnx(f"unsupported protobuf wire type {wire}")
        if position > end:
            raise MalformedOnnx("truncated protobuf message")
        yield number, value


def _varint(buffer: memoryview, position: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if position >= len(buffer) or shift > 63:
            raise MalformedOnnx("truncated or malformed varint")
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
