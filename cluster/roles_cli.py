"""`disagg roles`: list a serving cluster's instances with their roles, or change one
instance's role (`--set INSTANCE=ROLE`), through the gRPC admin service (cluster/admin.py)."""
from __future__ import annotations

import argparse
import json
import os

import grpc

from cluster.grpc_client import auth_metadata, channel
from engine.errors import DisaggError
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

ROLES = ("prefill", "decode", "colocated")


def _assignment(text: str) -> tuple[str, str]:
    instance, sep, role = text.partition("=")
    if not sep or not instance.strip() or not role.strip():
        raise argparse.ArgumentTypeError(f"--set takes INSTANCE=ROLE (e.g. decode-1=prefill), got {text!r}")
    role = role.strip()
    if role not in ROLES:
        raise argparse.ArgumentTypeError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return instance.strip(), role


def add_roles_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of a `disagg serve` gRPC endpoint")
    p.add_argument("--token", default=os.environ.get("DISAGG_TOKEN"), help="bearer token (default $DISAGG_TOKEN)")
    p.add_argument("--tls-ca", default=None, help="CA certificate for a TLS server")
    p.add_argument("--set", type=_assignment, default=None, metavar="INSTANCE=ROLE",
                   help="change INSTANCE's role (prefill, decode or colocated) while serving; waits until done")
    p.add_argument("--reason", default="", help="logged with the change (--set)")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    md = auth_metadata(args.token)
    with channel(args.server, args.tls_ca) as ch:
        stub = pb_grpc.AdminStub(ch)
        try:
            if args.set:
                instance, role = args.set
                r = stub.ChangeRole(pb.ChangeRoleRequest(instance_id=instance, role=role,
                                                         reason=args.reason or "disagg roles --set"),
                                    timeout=args.timeout, metadata=md)
                if args.json:
                    print(json.dumps({"instance_id": r.instance_id, "old_role": r.old_role, "role": r.role,
                                      "seconds": r.seconds, "drain_s": r.drain_s, "handed_over": r.handed_over}))
                else:
                    print(f"{r.instance_id}: {r.old_role} -> {r.role} in {r.seconds:.2f} s "
                          f"(drain {r.drain_s:.2f} s, {r.handed_over} requests handed over)")
            resp = stub.ListInstances(pb.ListInstancesRequest(), timeout=args.timeout, metadata=md)
        except grpc.RpcError as e:
            raise DisaggError(f"server {args.server}: {e.code().name}: {e.details()}") from None
    if args.json:
        if not args.set:
            print(json.dumps([{"instance_id": i.instance_id, "role": i.role, "alive": i.alive, "draining": i.draining,
                               "tp": i.tp, "num_blocks": i.num_blocks} for i in resp.instances]))
        return 0
    print(f"{'INSTANCE':<16} {'ROLE':<10} {'ALIVE':<6} {'TP':>3} {'BLOCKS':>7}")
    for i in resp.instances:
        state = "yes" if i.alive else "no"
        print(f"{i.instance_id:<16} {i.role + ('*' if i.draining else ''):<10} {state:<6} {i.tp:>3} {i.num_blocks:>7}")
    return 0
