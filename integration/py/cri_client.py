"""A CRI client on Python grpcio (gRPC C-core), with grpcio's default
:authority for a unix socket (the %-encoded socket path since 1.57).

Messages are encoded by hand (a few varint/bytes fields) so no generated
stubs are needed. Usage: cri_client.py SOCKET [--authority A]
Prints one line per call and "ok"; exits 1 naming the call that failed.
"""
import sys

import grpc


def field(num, value):
    """Encodes one length-delimited protobuf field."""
    data = value.encode() if isinstance(value, str) else value
    return varint(num << 3 | 2) + varint(len(data)) + data


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def fields(msg):
    """Yields a message's fields as (num, value): bytes when length-delimited,
    an int for varints (fixed-width ones are skipped)."""
    i = 0
    while i < len(msg):
        key, i = read_varint(msg, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(msg, i)
            yield num, value
        elif wire == 2:
            n, i = read_varint(msg, i)
            yield num, msg[i:i + n]
            i += n
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"wire type {wire}")


def strings(msg):
    """Decodes the length-delimited fields of a message: {num: [bytes]}."""
    out = {}
    for num, value in fields(msg):
        if isinstance(value, bytes):
            out.setdefault(num, []).append(value)
    return out


def read_varint(b, i):
    shift = n = 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return n, i


def call(channel, method, request):
    fn = channel.unary_unary(
        method,
        request_serializer=lambda x: x,
        response_deserializer=lambda x: x,
    )
    try:
        return fn(request, timeout=60)
    except grpc.RpcError as e:
        print(f"{method}: {e.code().name}: {e.details()}", file=sys.stderr)
        sys.exit(1)


def main():
    sock = sys.argv[1]
    options = []
    if "--authority" in sys.argv:
        options.append(("grpc.default_authority", sys.argv[sys.argv.index("--authority") + 1]))
    with grpc.insecure_channel(f"unix:{sock}", options=options) as ch:
        rt = "/runtime.v1.RuntimeService/"
        v = strings(call(ch, rt + "Version", field(1, "v1")))
        # VersionResponse: 2 runtime_name, 3 runtime_version, 4 runtime_api_version
        print("version", v[2][0].decode(), v[3][0].decode(), v[4][0].decode())
        call(ch, rt + "Status", b"")
        call(ch, "/runtime.v1.ImageService/ListImages", b"")
        # RunPodSandboxRequest{config{metadata{name, uid, namespace}}}, no hostname.
        meta = field(1, "grpcio") + field(2, f"grpcio-{__import__('os').getpid()}") + field(3, "default")
        r = strings(call(ch, rt + "RunPodSandbox", field(1, field(1, meta))))
        pod = r[1][0].decode()
        print("pod", pod)
        call(ch, rt + "StopPodSandbox", field(1, pod))
        call(ch, rt + "RemovePodSandbox", field(1, pod))
        # Stopping an unknown pod succeeds, as on containerd.
        call(ch, rt + "StopPodSandbox", field(1, "no-such-pod"))
    print("ok")


if __name__ == "__main__":
    main()
