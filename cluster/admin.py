"""The gRPC admin service (disagg.v1.Admin): list the instances with their roles, change one
instance's role while serving (cluster/roles.py). It sits on the same server as Inference,
behind the same bearer token (cluster/front_guard.py AuthInterceptor checks every method but
health)."""
from __future__ import annotations

import logging

import grpc

from cluster.roles import RoleChangeError
from engine.errors import ConfigError
from protos import inference_pb2 as pb

log = logging.getLogger("disagg.admin")
SERVICE = "disagg.v1.Admin"
CODES = {"not_found": grpc.StatusCode.NOT_FOUND, "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
         "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION, "unavailable": grpc.StatusCode.UNAVAILABLE}


def instance_infos(controller) -> list[pb.InstanceInfo]:
    return [pb.InstanceInfo(instance_id=i.instance_id, role=i.role, alive=i.alive, draining=i.draining,
                            tp=i.phase.tp, num_blocks=i.num_blocks)
            for i in sorted(controller.instances, key=lambda i: i.instance_id)]


class AdminService:
    def __init__(self, cluster):
        self.cluster = cluster

    async def _ready(self, context) -> None:
        if self.cluster.inputs is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is starting; try again shortly")

    async def list_instances(self, request: pb.ListInstancesRequest, context) -> pb.ListInstancesResponse:
        await self._ready(context)
        return pb.ListInstancesResponse(instances=instance_infos(self.cluster.controller))

    async def change_role(self, request: pb.ChangeRoleRequest, context) -> pb.ChangeRoleResponse:
        await self._ready(context)
        if not request.instance_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "instance_id: empty; `disagg roles` lists them")
        try:
            done = await self.cluster.controller.roles.change(request.instance_id, request.role, request.reason)
        except RoleChangeError as e:
            await context.abort(CODES.get(e.code, grpc.StatusCode.FAILED_PRECONDITION), str(e))
        except ConfigError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return pb.ChangeRoleResponse(instance_id=done.instance_id, old_role=done.old_role, role=done.role,
                                     seconds=done.seconds, drain_s=done.drain_s, handed_over=done.handed_over)


def admin_handler(cluster) -> grpc.GenericRpcHandler:
    svc = AdminService(cluster)
    methods = {
        "ListInstances": grpc.unary_unary_rpc_method_handler(
            svc.list_instances, request_deserializer=pb.ListInstancesRequest.FromString,
            response_serializer=pb.ListInstancesResponse.SerializeToString),
        "ChangeRole": grpc.unary_unary_rpc_method_handler(
            svc.change_role, request_deserializer=pb.ChangeRoleRequest.FromString,
            response_serializer=pb.ChangeRoleResponse.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(SERVICE, methods)
