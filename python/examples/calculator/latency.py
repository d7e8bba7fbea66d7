"""c=1 latency of Add: python latency.py ADDR [N]. Prints p50/p90/p99 in ms (after a
warm-up), one JSON line. Run it against the service directly and through pitboss."""

import json
import sys
import time

import grpc

import calc_pb2
import calc_pb2_grpc

addr, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2000
stub = calc_pb2_grpc.CalculatorStub(grpc.insecure_channel(addr))
req = calc_pb2.AddRequest(a=2, b=3)
for _ in range(200):
    stub.Add(req, timeout=10)
lat = []
for _ in range(n):
    t = time.perf_counter()
    stub.Add(req, timeout=10)
    lat.append((time.perf_counter() - t) * 1000)
lat.sort()
pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3)
print(json.dumps({"addr": addr, "n": n, "p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99)}))
