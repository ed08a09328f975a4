"""An attestation client on Python grpcio, against imacri's verifier socket:
enrollment data, a refused credential, and no CRI there.

Usage: attest_client.py SOCKET. Prints one line per call and "ok"; exits 1
naming the call that failed.
"""
import sys

import grpc

from cri_client import call, field, strings


def expect_code(channel, method, request, code):
    fn = channel.unary_unary(
        method, request_serializer=lambda x: x, response_deserializer=lambda x: x
    )
    try:
        fn(request, timeout=60)
    except grpc.RpcError as e:
        if e.code() == code:
            print(method, e.code().name, e.details())
            return
        print(f"{method}: {e.code().name}, wanted {code.name}: {e.details()}", file=sys.stderr)
        sys.exit(1)
    print(f"{method}: succeeded, wanted {code.name}", file=sys.stderr)
    sys.exit(1)


def main():
    with grpc.insecure_channel(f"unix:{sys.argv[1]}") as ch:
        svc = "/imacri.attestation.v1.Attestation/"
        # GetEnrollmentResponse: 1 ek_certificate, 2 ek_public, 3 ak_public
        e = strings(call(ch, svc + "GetEnrollment", b""))
        cert, ek, ak = e[1][0], e[2][0], e[3][0]
        if cert[:1] != b"\x30" or len(ek) < 256 or len(ak) < 64:
            print(f"GetEnrollment: unexpected sizes {len(cert)} {len(ek)} {len(ak)}", file=sys.stderr)
            sys.exit(1)
        print("enrollment", len(cert), len(ek), len(ak))
        # A credential not made for this TPM: the TPM refuses it.
        junk = field(1, b"\x00\x20" + bytes(40)) + field(2, bytes(256))
        expect_code(ch, svc + "ActivateCredential", junk, grpc.StatusCode.INVALID_ARGUMENT)
        # Nothing on the verifier socket changes the node.
        expect_code(ch, "/runtime.v1.RuntimeService/RunPodSandbox", b"", grpc.StatusCode.UNIMPLEMENTED)
    print("ok")


if __name__ == "__main__":
    main()
