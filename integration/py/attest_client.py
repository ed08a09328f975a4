"""An attestation client on Python grpcio, against imacri's verifier socket:
enrollment data, a refused credential, no CRI there, and with a POD,
evidence from the first entry, from a checkpoint (incremental) and from
the pod's first entries appraised, a page of the log and one of the pod's
own entries.

Usage: attest_client.py SOCKET [POD]. Prints one line per call and "ok";
exits 1 naming the call that failed.
attest_client.py SOCKET --pages POD: the whole log in GetLogPage pages (each
MiBs, sent in slices), then POD's whole-log Quote (tens of MiB): prints
"pages ENTRIES PAGES BYTES" and "quote LOG_ENTRIES BYTES".
"""
import os
import sys

import grpc

from cri_client import call, field, fields, strings, varint


def varints(msg):
    """Decodes the varint fields of a message: {num: int} (last wins)."""
    return {num: v for num, v in fields(msg) if isinstance(v, int)}


def quote(ch, pod, from_entry=0, from_epoch=0, pod_from=0):
    """Evidence (QuoteResponse field 1) for POD: its fields and varints."""
    req = field(1, pod) + field(2, os.urandom(16))
    if from_entry:
        req += varint(3 << 3) + varint(from_entry) + varint(4 << 3) + varint(from_epoch)
    if pod_from:
        req += varint(5 << 3) + varint(pod_from)
    ev = strings(call(ch, "/imacri.attestation.v1.Attestation/Quote", req))[1][0]
    return strings(ev), varints(ev)


def incremental(ch, pod):
    # Evidence: 5 epoch (3 started_at), 7 log, 8 pod_log, 9 quote,
    # 11 log_start, 12 pod_log_start
    ev, num = quote(ch, pod)
    n, started = len(ev[7]), varints(ev[5][0]).get(3, 0)
    if num.get(11, 0) != 0 or n == 0 or 9 not in ev:
        print(f"Quote: log_start {num.get(11)}, {n} entries, quote {9 in ev}", file=sys.stderr)
        sys.exit(1)
    inc, inum = quote(ch, pod, n, started)
    carried = len(inc.get(7, []))
    if inum.get(11) != n or carried >= n or len(inc[8]) != len(ev[8]):
        print(f"Quote from {n}: log_start {inum.get(11)}, {carried} entries, "
              f"{len(inc[8])} of the pod's (was {len(ev[8])})", file=sys.stderr)
        sys.exit(1)
    # The pod's first entry appraised: left out of pod_log.
    own, onum = quote(ch, pod, n, started, 1)
    if onum.get(12) != 1 or len(own.get(8, [])) != len(ev[8]) - 1 or own.get(8, [])[:1] != ev[8][1:2]:
        print(f"Quote from the pod's entry 1: pod_log_start {onum.get(12)}, "
              f"{len(own.get(8, []))} of the pod's (was {len(ev[8])})", file=sys.stderr)
        sys.exit(1)
    # Without a checkpoint, no entry of the pod is left out.
    _, wnum = quote(ch, pod, 0, started, 1)
    if wnum.get(12, 0) != 0:
        print(f"Quote from the pod's entry 1 alone: pod_log_start {wnum.get(12)}", file=sys.stderr)
        sys.exit(1)
    # Another epoch's checkpoint: the whole log again.
    again, anum = quote(ch, pod, n, started + 1)
    if anum.get(11, 0) != 0 or len(again[7]) < n:
        print(f"Quote from another epoch: log_start {anum.get(11)}", file=sys.stderr)
        sys.exit(1)
    print("incremental", n, carried)
    # GetLogPage: 1 from_entry, 2 max_entries -> 1 entries, 2 from_entry, 4 more
    req = varint(1 << 3) + varint(1) + varint(2 << 3) + varint(1)
    page = call(ch, "/imacri.attestation.v1.Attestation/GetLogPage", req)
    entries, pnum = strings(page).get(1, []), varints(page)
    if len(entries) != 1 or b"imacri-ng2-redacted" not in entries[0] or pnum.get(2) != 1 or pnum.get(4) != 1:
        print(f"GetLogPage from 1: {entries} {pnum}", file=sys.stderr)
        sys.exit(1)
    expect_code(ch, "/imacri.attestation.v1.Attestation/GetLogPage",
                varint(2 << 3) + varint(100001), grpc.StatusCode.INVALID_ARGUMENT)
    print("page", entries[0].decode().split(" ")[2])
    # A page of the pod's own entries (3 pod_sandbox_id), whole, from its
    # second on -> 5 pod_sandbox_id, 6 backend: the pod_log's from 1.
    req = varint(1 << 3) + varint(1) + varint(2 << 3) + varint(2) + field(3, pod)
    page = call(ch, "/imacri.attestation.v1.Attestation/GetLogPage", req)
    own, pstr, pnum = strings(page).get(1, []), strings(page), varints(page)
    more = len(ev[8]) > 3
    if own != ev[8][1:3] or pstr.get(5) != [pod.encode()] or pstr.get(6) != [b"fanotify"] \
            or bool(pnum.get(4, 0)) != more:
        print(f"GetLogPage of {pod} from 1: {own} {pstr.get(5)} {pstr.get(6)} {pnum} "
              f"(its entries: {ev[8]})", file=sys.stderr)
        sys.exit(1)
    expect_code(ch, "/imacri.attestation.v1.Attestation/GetLogPage",
                field(3, "no-such-pod"), grpc.StatusCode.NOT_FOUND)
    print("pod page", len(own))
    # GetLog: 1 pod_sandbox_id -> 1 entries: all the pod's entries, whole.
    log = strings(call(ch, "/imacri.attestation.v1.Attestation/GetLog", field(1, pod))).get(1, [])
    if log[:len(ev[8])] != ev[8]:
        print(f"GetLog of {pod}: {log} (its entries: {ev[8]})", file=sys.stderr)
        sys.exit(1)
    print("log", len(log) >= len(ev[8]))


def pages(sock, pod):
    """Reads the whole log page by page, then POD's whole-log Quote, with
    grpcio's receive limit raised to the 64 MiB evidence may take."""
    opts = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(f"unix:{sock}", options=opts) as ch:
        total, count, size = 0, 0, 0
        while True:
            # 1 from_entry -> 1 entries, 2 from_entry, 4 more
            req = varint(1 << 3) + varint(total) if total else b""
            page = call(ch, "/imacri.attestation.v1.Attestation/GetLogPage", req)
            got, num = strings(page).get(1, []), varints(page)
            if num.get(2, 0) != total:
                print(f"GetLogPage from {total}: from_entry {num.get(2, 0)}", file=sys.stderr)
                sys.exit(1)
            total, count, size = total + len(got), count + 1, size + len(page)
            if not num.get(4, 0):
                break
        print("pages", total, count, size)
        req = field(1, pod) + field(2, os.urandom(16))
        resp = call(ch, "/imacri.attestation.v1.Attestation/Quote", req)
        ev = strings(strings(resp)[1][0])
        print("quote", len(ev.get(7, [])), len(resp))


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
    if sys.argv[2:3] == ["--pages"]:
        return pages(sys.argv[1], sys.argv[3])
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
        if len(sys.argv) > 2:
            incremental(ch, sys.argv[2])
    print("ok")


if __name__ == "__main__":
    main()
