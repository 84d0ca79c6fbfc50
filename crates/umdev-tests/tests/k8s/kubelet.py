"""A kubelet in Python for umdev-k8s's tests: its stubs are generated (by the test, with
grpcio-tools) from the kubelet's own v1beta1 proto, so it checks the plugin's wire schema
independently of the plugin's Rust definitions.

Usage: kubelet.py DEVICE_PLUGIN_DIR RESOURCE. Serves Registration on DIR/kubelet.sock and
prints "listening"; when RESOURCE registers it dials the plugin back, calls
GetDevicePluginOptions, reads the first ListAndWatch answer and allocates the first device,
printing one "key value" line per finding, then "done".
"""

import os
import sys
import threading
from concurrent import futures

import grpc

import v1beta1_pb2 as api
import v1beta1_pb2_grpc as rpc

DIR, RESOURCE = sys.argv[1], sys.argv[2]
registered = threading.Event()
request = {}


class Registration(rpc.RegistrationServicer):
    def Register(self, req, context):
        if req.resource_name != RESOURCE:
            return api.Empty()
        if req.version != "v1beta1" or "/" in req.endpoint:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad registration")
        request["req"] = req
        registered.set()
        return api.Empty()


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    rpc.add_RegistrationServicer_to_server(Registration(), server)
    server.add_insecure_port("unix://" + os.path.join(DIR, "kubelet.sock"))
    server.start()
    print("listening", flush=True)
    if not registered.wait(20):
        print("never registered", flush=True)
        sys.exit(1)
    req = request["req"]
    print(f"register version={req.version} resource={req.resource_name} endpoint={req.endpoint}", flush=True)
    # Go's gRPC, which the kubelet uses, sends "localhost" as the authority of a UNIX
    # socket; grpc-core would send the socket's path, which is not a valid authority.
    channel = grpc.insecure_channel("unix://" + os.path.join(DIR, req.endpoint),
                                    options=[("grpc.default_authority", "localhost")])
    plugin = rpc.DevicePluginStub(channel)
    o = plugin.GetDevicePluginOptions(api.Empty(), timeout=10)
    print(f"options pre_start_required={o.pre_start_required} "
          f"get_preferred_allocation_available={o.get_preferred_allocation_available}", flush=True)
    stream = plugin.ListAndWatch(api.Empty(), timeout=10)
    first = next(iter(stream))
    stream.cancel()
    print("devices " + " ".join(f"{d.ID}:{d.health}" for d in first.devices), flush=True)
    r = plugin.Allocate(api.AllocateRequest(container_requests=[
        api.ContainerAllocateRequest(devicesIDs=[first.devices[0].ID])]), timeout=20)
    c = r.container_responses[0]
    for m in c.mounts:
        print(f"mount {m.container_path} <- {m.host_path}", flush=True)
    for k in sorted(c.envs):
        print(f"env.{k} {c.envs[k]}", flush=True)
    print("done", flush=True)
    server.stop(0)


main()
