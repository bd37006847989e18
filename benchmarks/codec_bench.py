"""Codec micro-benchmark: 1 GiB through a sender and a receiver CarrierSession.

The sender writes 64 KiB chunks within its credit; the receiver acknowledges every
chunk with `consumed()`, and the MAX_DATA frames that produces flow back and raise the
sender's credit (default 256 KiB window). The reference is a plain memoryview-copy loop
of the same volume in the same run: each 64 KiB chunk copied once into a fresh bytes
object, which is the least any receive path must do. Not a test; run it by hand:

    .venv/bin/python benchmarks/codec_bench.py [--gib 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import time

from gateway_codecs import (
    CarrierSession,
    CircuitKind,
    CreditGranted,
    DataReceived,
    OpenRequest,
    Role,
)

CHUNK = 64 * 1024


def _pattern() -> bytes:
    """Non-zero, random-looking data (a fixed seed keeps runs comparable)."""
    block = random.Random(0x7E57).randbytes(4 * CHUNK)
    return block.replace(b"\0", b"\x01")


def copy_loop(total: int, source: bytes) -> float:
    """Seconds to copy `total` bytes in 64 KiB pieces through a memoryview."""
    view = memoryview(source)
    span = len(source) - CHUNK
    moved = 0
    sink = 0
    start = time.perf_counter()
    while moved < total:
        off = moved % span
        piece = bytes(view[off : off + CHUNK])
        sink += len(piece)
        moved += CHUNK
    elapsed = time.perf_counter() - start
    assert sink == moved
    return elapsed


def codec_round_trip(total: int, source: bytes) -> float:
    """Seconds to move `total` bytes sender -> receiver with credit flowing back."""
    sender = CarrierSession(Role.DIALER)
    receiver = CarrierSession(Role.ACCEPTOR)
    receiver.receive_data(sender.data_to_send())
    sender.receive_data(receiver.data_to_send())
    cid = sender.open_circuit(OpenRequest(CircuitKind.TCP, "127.0.0.1", 5201))
    receiver.receive_data(sender.data_to_send())
    receiver.accept_circuit(cid)
    sender.receive_data(receiver.data_to_send())

    view = memoryview(source)
    span = len(source) - CHUNK
    sent = received = 0
    send_data, credit = sender.send_data, sender.send_credit
    consumed = receiver.consumed
    start = time.perf_counter()
    while received < total:
        while sent < total and credit(cid) >= CHUNK:
            off = sent % span
            send_data(cid, view[off : off + CHUNK])
            sent += CHUNK
        for event in receiver.receive_data(sender.data_to_send()):
            if type(event) is DataReceived:
                n = len(event.data)
                received += n
                consumed(cid, n)
        for event in sender.receive_data(receiver.data_to_send()):
            assert type(event) is CreditGranted
    elapsed = time.perf_counter() - start
    assert sender.offsets(cid)[0] == receiver.offsets(cid)[2] == total
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="volume in GiB (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; best counts")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    total = int(args.gib * (1 << 30)) // CHUNK * CHUNK
    source = _pattern()
    copy_s = codec_s = float("inf")
    for _ in range(args.repeat):  # interleaved, so both see the same machine state
        copy_s = min(copy_s, copy_loop(total, source))
        codec_s = min(codec_s, codec_round_trip(total, source))
    copy_mbs = total / copy_s / 1e6
    codec_mbs = total / codec_s / 1e6
    result = {
        "bytes": total,
        "write_size": CHUNK,
        "repeat": args.repeat,
        "copy_loop_mb_s": round(copy_mbs, 1),
        "codec_mb_s": round(codec_mbs, 1),
        "ratio": round(codec_mbs / copy_mbs, 3),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'path':<28}{'seconds':>10}{'MB/s':>12}")
    print(f"{'memoryview copy loop':<28}{copy_s:>10.3f}{copy_mbs:>12.1f}")
    print(f"{'codec round trip':<28}{codec_s:>10.3f}{codec_mbs:>12.1f}")
    print(f"ratio codec / copy: {result['ratio']:.3f}x  (volume {total / (1 << 30):.2f} GiB, "
          f"{CHUNK // 1024} KiB writes)")


if __name__ == "__main__":
    main()
