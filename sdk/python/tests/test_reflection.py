"""What grpcurl does, with grpcio-reflection: no stubs, only the server's reflection (v1alpha,
which grpcio-reflection speaks) to find the schema, a JSON request, sent to a follower."""

from __future__ import annotations

import json
import uuid

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import engram


def test_a_json_write_to_a_follower_found_by_reflection(cluster, root_key):
    with engram.Client(cluster.endpoints, api_key=root_key, ca_file=cluster.ca) as c:
        leader = c.status().leader_id
        name = f"acme/reflect-{uuid.uuid4().hex[:8]}"
        c.create_namespace(name, dimension=3)
    follower = next(n for n in cluster.nodes if n.id != leader)
    with open(cluster.ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    with grpc.secure_channel(follower.api, creds) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        assert "engram.v1.MemoryService" in db.get_services()
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName("engram.v1.MemoryService").FindMethodByName("Put")
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        body = {"namespace": name, "memory": {"id": "r1", "text": "written by JSON", "embedding": [0.1, 0.2, 0.3]}}
        req = json_format.Parse(json.dumps(body), req_cls())
        call = ch.unary_unary("/engram.v1.MemoryService/Put", request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=resp_cls.FromString)
        resp = call(req, metadata=(("authorization", f"Bearer {root_key}"),), timeout=10)
        out = json_format.MessageToDict(resp)
        assert out["id"] == "r1" and int(out["revision"]) > 0
    with engram.Client(cluster.endpoints, api_key=root_key, ca_file=cluster.ca) as c:
        assert c.get(name, "r1").text == "written by JSON"
